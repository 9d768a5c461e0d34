//! Reading and writing the safetensors format, validated before anything is allocated.
//!
//! We parse the header ourselves (an 8-byte little-endian length, then a JSON table of
//! `name -> {dtype, shape, data_offsets}`) and read each tensor with a positioned read, so:
//! - a header whose offsets, shapes or sizes are inconsistent with the file is rejected with the
//!   tensor's name before any tensor memory is allocated;
//! - only one tensor's bytes are in host memory at a time (no mmap, no second copy of a model).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A header larger than this is refused (phi-2's are ~30 KB).
pub const MAX_HEADER_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F64" => Dtype::F64,
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            "I16" => Dtype::I16,
            "I8" => Dtype::I8,
            "U8" => Dtype::U8,
            "BOOL" => Dtype::Bool,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
        }
    }
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }
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
        if !info.dtype.is_float() {
            return Err(Error::checkpoint(
                &self.path,
                format!(
                    "tensor {name} has dtype {}, expected a float type",
                    info.dtype.name()
                ),
            ));
        }
        let bytes = self.read_bytes(name)?;
        Ok((bytes_to_f32(&bytes, info.dtype), info.shape))
    }
}

fn parse_header(
    header: &[u8],
    data_start: u64,
    file_len: u64,
) -> std::result::Result<(BTreeMap<String, TensorInfo>, BTreeMap<String, String>), String> {
    let value: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format!("header is not JSON: {e}"))?;
    let obj = value.as_object().ok_or("header is not a JSON object")?;
    let data_len = file_len - data_start;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, entry) in obj {
        if name == "__metadata__" {
            let m = entry.as_object().ok_or("__metadata__ is not an object")?;
            for (k, v) in m {
                let v = v
                    .as_str()
                    .ok_or_else(|| format!("__metadata__.{k} is not a string"))?;
                metadata.insert(k.clone(), v.to_string());
            }
            continue;
        }
        let e = entry
            .as_object()
            .ok_or_else(|| format!("entry for tensor {name} is not an object"))?;
        let dtype_s = e
            .get("dtype")
            .and_then(|v| v.as_str())
            .ok_or_else(|| format!("tensor {name} has no dtype"))?;
        let dtype = Dtype::parse(dtype_s)
            .ok_or_else(|| format!("tensor {name} has unsupported dtype {dtype_s}"))?;
        let shape: Vec<usize> = e
            .get("shape")
            .and_then(|v| v.as_array())
            .ok_or_else(|| format!("tensor {name} has no shape"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| format!("tensor {name} has a shape that is not a list of sizes"))?;
        let offsets = e
            .get("data_offsets")
            .and_then(|v| v.as_array())
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| format!("tensor {name} has no valid data_offsets [start, end]"))?;
        let nbytes = shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| format!("tensor {name} shape {shape:?} overflows"))?;
        let (s, en) = offsets;
        if s > en || en > data_len {
            return Err(format!(
                "tensor {name} data_offsets [{s}, {en}] lie outside the {data_len} data bytes of the file"
            ));
        }
        if en - s != nbytes {
            return Err(format!(
                "tensor {name} is {dtype_s} {shape:?} ({nbytes} bytes) but its data_offsets span {} bytes",
                en - s
            ));
        }
        tensors.insert(
            name.clone(),
            TensorInfo {
                dtype,
                shape,
                start: data_start + s,
                end: data_start + en,
            },
        );
    }
    let mut ranges: Vec<(u64, u64, &str)> = tensors
        .iter()
        .map(|(n, t)| (t.start, t.end, n.as_str()))
        .collect();
    ranges.sort();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(format!(
                "tensors {} and {} overlap in the file",
                w[0].2, w[1].2
            ));
        }
    }
    Ok((tensors, metadata))
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

/// Converts little-endian float bytes of any supported float dtype to f32.
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
        other => panic!("bytes_to_f32 called with non-float dtype {}", other.name()),
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
        other => panic!("f32_to_bytes called with non-float dtype {}", other.name()),
    }
}

/// One tensor to be written.
pub struct TensorOut<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: std::borrow::Cow<'a, [u8]>,
}

/// Builds the header for tensors written in the given order.
fn header_bytes(
    entries: &[(&str, Dtype, &[usize])],
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).unwrap(),
        );
    }
    let mut offset = 0u64;
    for (name, dtype, shape) in entries {
        let end = offset + (shape.iter().product::<usize>() * dtype.size()) as u64;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !bytes.len().is_multiple_of(8) {
        bytes.push(b' ');
    }
    bytes
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
        if t.shape.iter().product::<usize>() * t.dtype.size() != t.data.len() {
            return Err(Error::Invalid(format!(
                "tensor {} has {} bytes of data for shape {:?} {}",
                t.name,
                t.data.len(),
                t.shape,
                t.dtype.name()
            )));
        }
    }
    let entries: Vec<(&str, Dtype, &[usize])> = order
        .iter()
        .map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice()))
        .collect();
    let header = header_bytes(&entries, metadata);
    crate::atomic_write(path, |f| {
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
        let header = header_bytes(&refs, metadata);
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
                .map(|(n, d, s)| (n.clone(), s.iter().product::<usize>() * d.size()))
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
                name: format!("t.{}", d.name()),
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
}
