//! The GGUF writer: the header (metadata and tensor declarations), then each tensor's bytes.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::value::put_string;
use super::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS, MAX_TENSOR_NAME_BYTES, VERSION, padded,
};
use super::{GgmlType, Value};
use crate::error::{Error, Result};

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
/// [`GgufWriter::write_tensor`] takes each tensor's encoded bytes ([`quantize`](super::quantize)) in the declared
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

    /// Writes the next declared tensor's encoded bytes (see [`quantize`](super::quantize)) and the padding after
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::test_util::*;
    use crate::io::gguf::{Array, dequantize, quantize};
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
}
