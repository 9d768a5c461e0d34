//! Reading and writing the safetensors format through its reference implementation (the
//! `safetensors` crate), validated before anything is allocated.
//!
//! We read the 8-byte length and the header ourselves (bounded by [`MAX_HEADER_BYTES`] and the
//! file's size) and let the crate's header types validate it: every tensor's byte size against
//! its dtype and shape, without overflow, and offsets that tile the data exactly, without gaps
//! or overlaps, up to the end of the file. Its `SafeTensors::read_metadata` would do the same
//! but wants the whole file in memory; instead each tensor is read with a positioned read, so
//! - a header inconsistent with the file is rejected, naming the tensor, before any tensor
//!   memory is allocated;
//! - only one tensor's bytes are in host memory at a time (no mmap, no second copy of a model).
//!
//! The writers build their header with the same types, so what we write is what we (and the
//! crate) accept.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ::safetensors::SafeTensorError;
pub use ::safetensors::tensor::Dtype;
use ::safetensors::tensor::{Metadata, TensorInfo as HeaderEntry};
use serde::Deserialize;

use crate::error::{Error, Result};

/// A header larger than this is refused (phi-2's are ~30 KB).
pub const MAX_HEADER_BYTES: u64 = 64 << 20;

/// Bytes per element (every dtype we read or write is whole bytes).
pub fn dtype_bytes(dtype: Dtype) -> usize {
    dtype.bitsize() / 8
}

/// The float dtypes [`bytes_to_f32`] converts.
pub fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open safetensors file whose header has been validated.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let bad =
            |msg: String| Error::checkpoint(path, format!("not a valid safetensors file: {msg}"));
        if file_len < 8 {
            return Err(bad(format!("only {file_len} bytes long")));
        }
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes)
            .map_err(|e| Error::io(path, e))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES || header_len > file_len - 8 {
            return Err(bad(format!(
                "header length {header_len} exceeds the file size {file_len} (or the {MAX_HEADER_BYTES}-byte limit)"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| Error::io(path, e))?;
        let data_start = 8 + header_len;
        let (tensors, metadata) = parse_header(&header, data_start, file_len).map_err(bad)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The raw little-endian bytes of one tensor.
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::checkpoint(&self.path, format!("tensor {name} not found")))?;
        let mut buf = vec![0u8; (info.end - info.start) as usize];
        read_exact_at(&self.file, &mut buf, info.start).map_err(|e| Error::io(&self.path, e))?;
        Ok(buf)
    }

    /// One floating-point tensor converted to f32, with its shape.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self
            .tensors
            .get(name)
            .cloned()
            .ok_or_else(|| Error::checkpoint(&self.path, format!("tensor {name} not found")))?;
        if !is_float(info.dtype) {
            return Err(Error::checkpoint(
                &self.path,
                format!(
                    "tensor {name} has dtype {}, expected a float type",
                    info.dtype
                ),
            ));
        }
        let bytes = self.read_bytes(name)?;
        Ok((bytes_to_f32(&bytes, info.dtype), info.shape))
    }
}

type Parsed = (BTreeMap<String, TensorInfo>, BTreeMap<String, String>);

/// Validates a header with the crate's types; the error names the tensor at fault.
fn parse_header(
    header: &[u8],
    data_start: u64,
    file_len: u64,
) -> std::result::Result<Parsed, String> {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| match e.classify() {
            serde_json::error::Category::Data => format!("header is not a JSON object: {e}"),
            _ => format!("header is not JSON: {e}"),
        })?;
    let mut metadata = None;
    let mut entries = Vec::with_capacity(object.len());
    for (name, value) in object {
        if name == "__metadata__" {
            let m = HashMap::<String, String>::deserialize(&value)
                .map_err(|e| format!("__metadata__ is not a map of strings: {e}"))?;
            metadata = Some(m);
            continue;
        }
        let entry = entry(&name, &value)?;
        check_size(&name, &entry)?;
        entries.push((name, entry));
    }
    entries.sort_by_key(|(_, e)| e.data_offsets);
    let names: Vec<String> = entries.iter().map(|(n, _)| n.clone()).collect();
    let header = Metadata::new(metadata, entries).map_err(|e| match e {
        SafeTensorError::InvalidOffset(name) => {
            let at = names.iter().position(|n| *n == name);
            match at.and_then(|i| i.checked_sub(1)) {
                Some(prev) => format!(
                    "tensor {name} does not start where tensor {} ends: data_offsets must tile the data, without gaps or overlaps",
                    names[prev]
                ),
                None => format!("tensor {name} does not start at the beginning of the data"),
            }
        }
        other => other.to_string(),
    })?;
    let data_len = file_len - data_start;
    let end = header.data_len() as u64;
    if end > data_len {
        return Err(format!(
            "tensor data end at byte {end}, outside the {data_len} data bytes of the file"
        ));
    }
    if end < data_len {
        return Err(format!(
            "the file has {} bytes after the last tensor",
            data_len - end
        ));
    }
    let tensors = header
        .tensors()
        .into_iter()
        .map(|(name, e)| {
            let (s, en) = e.data_offsets;
            let info = TensorInfo {
                dtype: e.dtype,
                shape: e.shape.clone(),
                start: data_start + s as u64,
                end: data_start + en as u64,
            };
            (name, info)
        })
        .collect();
    let metadata = header
        .metadata()
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok((tensors, metadata))
}

/// One tensor's `{dtype, shape, data_offsets}`.
fn entry(name: &str, value: &serde_json::Value) -> std::result::Result<HeaderEntry, String> {
    serde_path_to_error::deserialize::<_, HeaderEntry>(value).map_err(|e| {
        let field = e.path().iter().next().map(|s| s.to_string());
        match field.as_deref() {
            Some("dtype") => format!("tensor {name} has unsupported dtype {}", value["dtype"]),
            Some(field) => format!("tensor {name} has an invalid {field}: {}", e.inner()),
            None => format!("entry for tensor {name} is not valid: {}", e.inner()),
        }
    })
}

/// The crate's check of one tensor alone: its byte size against its dtype and shape.
fn check_size(name: &str, entry: &HeaderEntry) -> std::result::Result<(), String> {
    let (s, e) = entry.data_offsets;
    let span = e.checked_sub(s).ok_or_else(|| {
        format!("tensor {name} has data_offsets [{s}, {e}] that end before they start")
    })?;
    let alone = HeaderEntry {
        data_offsets: (0, span),
        ..entry.clone()
    };
    Metadata::new(None, vec![(name.to_string(), alone)])
        .map(|_| ())
        .map_err(|err| match err {
            SafeTensorError::TensorInvalidInfo => format!(
                "tensor {name} is {} {:?} but its data_offsets span {span} bytes",
                entry.dtype, entry.shape
            ),
            SafeTensorError::ValidationOverflow => {
                format!("tensor {name} shape {:?} overflows", entry.shape)
            }
            other => format!("tensor {name}: {other}"),
        })
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

/// Converts little-endian float bytes of a dtype [`is_float`] accepts to f32.
pub fn bytes_to_f32(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        other => panic!("bytes_to_f32 called with non-float dtype {other}"),
    }
}

/// Converts f32 values to the little-endian bytes of a float dtype (round to nearest even).
pub fn f32_to_bytes(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::F64 => values
            .iter()
            .flat_map(|v| (*v as f64).to_le_bytes())
            .collect(),
        other => panic!("f32_to_bytes called with non-float dtype {other}"),
    }
}

/// One tensor to be written.
pub struct TensorOut<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: std::borrow::Cow<'a, [u8]>,
}

/// The header for tensors written in the given order, built and validated by the crate's
/// types and padded with spaces to a multiple of 8 bytes (as the crate pads).
fn header_bytes(
    path: &Path,
    entries: &[(&str, Dtype, &[usize])],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut offset = 0usize;
    let tensors = entries
        .iter()
        .map(|&(name, dtype, shape)| {
            let end = offset + shape.iter().product::<usize>() * dtype_bytes(dtype);
            let entry = HeaderEntry {
                dtype,
                shape: shape.to_vec(),
                data_offsets: (offset, end),
            };
            offset = end;
            (name.to_string(), entry)
        })
        .collect();
    let metadata = (!metadata.is_empty()).then(|| metadata.clone().into_iter().collect());
    let invalid = |e: String| Error::Invalid(format!("{}: {e}", path.display()));
    let header = Metadata::new(metadata, tensors).map_err(|e| invalid(e.to_string()))?;
    let mut bytes = serde_json::to_vec(&header).map_err(|e| invalid(e.to_string()))?;
    bytes.resize(bytes.len().next_multiple_of(8), b' ');
    Ok(bytes)
}

/// Writes a safetensors file (tensors in name order) to `path` via a temporary file and a
/// rename, so an interrupted write never leaves a truncated file behind.
pub fn write(
    path: &Path,
    tensors: &[TensorOut],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut order: Vec<&TensorOut> = tensors.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    for t in &order {
        if t.shape.iter().product::<usize>() * dtype_bytes(t.dtype) != t.data.len() {
            return Err(Error::Invalid(format!(
                "tensor {} has {} bytes of data for shape {:?} {}",
                t.name,
                t.data.len(),
                t.shape,
                t.dtype
            )));
        }
    }
    let entries: Vec<(&str, Dtype, &[usize])> = order
        .iter()
        .map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice()))
        .collect();
    let header = header_bytes(path, &entries, metadata)?;
    crate::io::atomic_write(path, |f| {
        f.write_all(&(header.len() as u64).to_le_bytes())?;
        f.write_all(&header)?;
        for t in &order {
            f.write_all(&t.data)?;
        }
        Ok(())
    })
}

/// Writes a large safetensors file tensor by tensor: the header is written first from the
/// declared names/dtypes/shapes, then each tensor's bytes in that order, so only one tensor is
/// in memory at a time.
pub struct StreamWriter {
    path: PathBuf,
    out: std::io::BufWriter<File>,
    expected: Vec<(String, usize)>,
    next: usize,
}

impl StreamWriter {
    pub fn create(
        path: &Path,
        entries: &[(String, Dtype, Vec<usize>)],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let refs: Vec<(&str, Dtype, &[usize])> = entries
            .iter()
            .map(|(n, d, s)| (n.as_str(), *d, s.as_slice()))
            .collect();
        let header = header_bytes(path, &refs, metadata)?;
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|_| out.write_all(&header))
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            out,
            expected: entries
                .iter()
                .map(|(n, d, s)| (n.clone(), s.iter().product::<usize>() * dtype_bytes(*d)))
                .collect(),
            next: 0,
        })
    }

    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        match self.expected.get(self.next) {
            Some((n, len)) if n == name && *len == bytes.len() => {}
            other => {
                return Err(Error::Invalid(format!(
                    "{}: tensor {name} ({} bytes) written out of order; expected {other:?}",
                    self.path.display(),
                    bytes.len()
                )));
            }
        }
        self.next += 1;
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))
    }

    pub fn finish(mut self) -> Result<()> {
        if self.next != self.expected.len() {
            return Err(Error::Invalid(format!(
                "{}: only {} of {} tensors written",
                self.path.display(),
                self.next,
                self.expected.len()
            )));
        }
        self.out.flush().map_err(|e| Error::io(&self.path, e))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("phitune-st-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("t.safetensors")
    }

    fn raw_file(path: &Path, header: &str, data_len: usize) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data_len));
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn round_trip_all_float_dtypes() {
        let p = tmp("rt");
        let vals = [1.0f32, -2.5, 0.125, 3.0e-3];
        let tensors: Vec<TensorOut> = [Dtype::F32, Dtype::F16, Dtype::BF16]
            .iter()
            .map(|&d| TensorOut {
                name: format!("t.{d}"),
                dtype: d,
                shape: vec![2, 2],
                data: Cow::Owned(f32_to_bytes(&vals, d)),
            })
            .collect();
        write(
            &p,
            &tensors,
            &BTreeMap::from([("format".into(), "pt".into())]),
        )
        .unwrap();
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.metadata()["format"], "pt");
        for d in ["F32", "F16", "BF16"] {
            let (v, s) = f.read_f32(&format!("t.{d}")).unwrap();
            assert_eq!(s, vec![2, 2]);
            for (a, b) in v.iter().zip(vals) {
                assert!((a - b).abs() <= b.abs() * 4e-3, "{d}: {a} vs {b}");
            }
        }
        // The format's reference reader accepts what we wrote, with the same tensors.
        let bytes = std::fs::read(&p).unwrap();
        let st = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), 3);
        let view = st.tensor("t.BF16").unwrap();
        assert_eq!(view.dtype(), Dtype::BF16);
        assert_eq!(view.shape(), [2, 2]);
        assert_eq!(view.data(), f32_to_bytes(&vals, Dtype::BF16));
    }

    #[test]
    fn stream_writer_output_equals_write() {
        let (a, b) = (tmp("stream-a"), tmp("stream-b"));
        let meta = BTreeMap::from([("format".into(), "pt".into())]);
        let x = f32_to_bytes(&[1.0, 2.0, 3.0], Dtype::F16);
        let y = f32_to_bytes(&[4.0], Dtype::F32);
        write(
            &a,
            &[
                TensorOut {
                    name: "x".into(),
                    dtype: Dtype::F16,
                    shape: vec![3],
                    data: Cow::Borrowed(&x),
                },
                TensorOut {
                    name: "y".into(),
                    dtype: Dtype::F32,
                    shape: vec![1, 1],
                    data: Cow::Borrowed(&y),
                },
            ],
            &meta,
        )
        .unwrap();
        let entries = [
            ("x".to_string(), Dtype::F16, vec![3]),
            ("y".to_string(), Dtype::F32, vec![1, 1]),
        ];
        let mut w = StreamWriter::create(&b, &entries, &meta).unwrap();
        w.write_tensor("x", &x).unwrap();
        assert!(w.write_tensor("x", &x).is_err(), "out of order");
        w.write_tensor("y", &y).unwrap();
        w.finish().unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    }

    #[test]
    fn rejects_inconsistent_headers_before_allocating() {
        let p = tmp("bad");
        let cases = [
            (
                r#"{"a":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,16]}}"#,
                16,
                "span 16 bytes",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
                "overlap",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                8,
                "outside",
            ),
            (
                r#"{"a":{"dtype":"Q4","shape":[4],"data_offsets":[0,16]}}"#,
                16,
                "unsupported dtype",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}}"#,
                16,
                "shape",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,16]}}"#,
                16,
                "overflows",
            ),
            (r#"[1,2,3]"#, 0, "not a JSON object"),
            (r#"{"a":"#, 0, "not JSON"),
        ];
        for (header, len, want) in cases {
            raw_file(&p, header, len);
            let e = SafetensorsFile::open(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{header}: {e}");
            assert!(e.contains("t.safetensors"), "{e}");
        }
        // A header length larger than the file.
        std::fs::write(&p, u64::MAX.to_le_bytes()).unwrap();
        let e = SafetensorsFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("header length"), "{e}");
        std::fs::write(&p, b"abc").unwrap();
        let e = SafetensorsFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("only 3 bytes"), "{e}");
    }

    #[test]
    fn gaps_and_trailing_bytes_are_refused_as_the_reference_reader_does() {
        let p = tmp("gaps");
        let cases = [
            // A gap between two tensors.
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
                12,
                "does not start where tensor a ends",
            ),
            // Data not starting at the beginning.
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8,
                "beginning of the data",
            ),
            // Bytes after the last tensor.
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                9,
                "5 bytes after the last tensor",
            ),
        ];
        for (header, len, want) in cases {
            raw_file(&p, header, len);
            let e = SafetensorsFile::open(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{header}: {e}");
            let bytes = std::fs::read(&p).unwrap();
            assert!(::safetensors::SafeTensors::deserialize(&bytes).is_err());
        }
    }
}
