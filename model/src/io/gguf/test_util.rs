//! Helpers shared by the GGUF tests: the gguf-py fixture, a test signal, temp files.

use std::path::PathBuf;

use serde_json::Value as Json;

use super::{Array, Value};

pub(super) fn fixture(name: &str) -> String {
    format!(
        "{}/../tests/fixtures/gguf/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

pub(super) fn fixture_json() -> Json {
    let text = std::fs::read_to_string(fixture("quants.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub(super) fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

pub(super) fn f32s(hex: &str) -> Vec<f32> {
    unhex(hex)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The first offset where `a` and `b` differ (or where the shorter one ends).
pub(super) fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i))
}

/// A deterministic, spread-out test signal (no RNG dependency): magnitudes over 10 decades.
pub(super) fn signal(n: usize, seed: u64) -> Vec<f32> {
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

pub(super) fn json_value(entry: &Json) -> Value {
    let ty = entry["type"].as_str().unwrap();
    let v = &entry["value"];
    let bits32 = |v: &Json| f32::from_bits(u32::from_str_radix(v.as_str().unwrap(), 16).unwrap());
    let bits64 = |v: &Json| f64::from_bits(u64::from_str_radix(v.as_str().unwrap(), 16).unwrap());
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
            "string" => Array::String(items().map(|s| s.as_str().unwrap().to_owned()).collect()),
            "i32" => Array::I32(items().map(|x| int(x) as i32).collect()),
            "u32" => Array::U32(items().map(|x| uint(x) as u32).collect()),
            "f32" => Array::F32(items().map(bits32).collect()),
            other => panic!("array of {other} not in the fixture reader"),
        }),
        other => panic!("value type {other}"),
    }
}

/// A file under the temp directory, removed on drop.
pub(super) struct TempFile(pub(super) PathBuf);

impl TempFile {
    pub(super) fn new(name: &str, bytes: &[u8]) -> Self {
        let path =
            std::env::temp_dir().join(format!("phitune-gguf-test-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(super) fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}
