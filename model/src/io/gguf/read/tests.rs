//! The reader against gguf-py's files, round trips through the writer, and corrupt headers.

use super::*;
use crate::io::gguf::test_util::*;
use crate::io::gguf::{GgufWriter, padded, quantize};

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
