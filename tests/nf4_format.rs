//! NF4 quantization is bit-for-bit bitsandbytes' (0.50, CPU): codes, absmax, double-quant
//! codes/scales/offset and dequantized values, on the cases in tests/fixtures/nf4/ (which pin
//! down ties, reciprocal-vs-division, partial and all-zero blocks, and the 8-bit grid).

mod common;

use phitune_model::io::safetensors::SafetensorsFile;
use phitune_model::ops::nf4_format::{Absmax, NF4_CODE, Nf4Host, code8, torch_sum_f32};

fn file() -> SafetensorsFile {
    SafetensorsFile::open(&common::fixtures().join("nf4/cases.safetensors")).unwrap()
}

fn f32s(f: &SafetensorsFile, name: &str) -> (Vec<f32>, Vec<usize>) {
    f.read_f32(name).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

const CASES: [&str; 5] = ["a", "b", "c", "d", "e"];

#[test]
fn code_tables_match() {
    let f = file();
    assert_eq!(bits(&f32s(&f, "nf4_code").0), bits(&NF4_CODE));
    assert_eq!(bits(&f32s(&f, "a.dq.code").0), bits(&code8()));
}

#[test]
fn single_quant_is_bit_identical() {
    let f = file();
    for c in CASES {
        let (w, shape) = f32s(&f, &format!("{c}.weight"));
        let q = Nf4Host::quantize(&w, [shape[0], shape[1]], false);
        assert_eq!(
            q.packed,
            f.read_bytes(&format!("{c}.packed")).unwrap(),
            "case {c}: packed codes"
        );
        let Absmax::F32(absmax) = &q.absmax else {
            panic!()
        };
        assert_eq!(
            bits(absmax),
            bits(&f32s(&f, &format!("{c}.absmax")).0),
            "case {c}: absmax"
        );
        assert_eq!(
            bits(&q.dequantize()),
            bits(&f32s(&f, &format!("{c}.dequant")).0),
            "case {c}: dequant"
        );
    }
}

#[test]
fn double_quant_is_bit_identical() {
    let f = file();
    for c in CASES {
        let (w, shape) = f32s(&f, &format!("{c}.weight"));
        let q = Nf4Host::quantize(&w, [shape[0], shape[1]], true);
        assert_eq!(
            q.packed,
            f.read_bytes(&format!("{c}.dq.packed")).unwrap(),
            "case {c}"
        );
        let Absmax::Double {
            codes,
            scales,
            offset,
        } = &q.absmax
        else {
            panic!()
        };
        assert_eq!(
            offset.to_bits(),
            f32s(&f, &format!("{c}.dq.offset")).0[0].to_bits(),
            "case {c}: offset"
        );
        assert_eq!(
            bits(scales),
            bits(&f32s(&f, &format!("{c}.dq.absmax_scales")).0),
            "case {c}: scales"
        );
        assert_eq!(
            codes,
            &f.read_bytes(&format!("{c}.dq.absmax_codes")).unwrap(),
            "case {c}: absmax codes"
        );
        assert_eq!(
            bits(&q.dequantize()),
            bits(&f32s(&f, &format!("{c}.dq.dequant")).0),
            "case {c}: dequant"
        );
    }
}

#[test]
fn torch_order_sum_matches_simple_cases() {
    assert_eq!(torch_sum_f32(&[1.0, 2.0, 3.0]), 6.0);
    let v: Vec<f32> = (0..1000).map(|i| i as f32).collect();
    assert_eq!(torch_sum_f32(&v), 499500.0);
}

/// Our device layout holds the same codes as bitsandbytes' bytes.
#[test]
fn device_words_hold_the_same_codes() {
    let f = file();
    let (w, shape) = f32s(&f, "b.weight");
    let q = Nf4Host::quantize(&w, [shape[0], shape[1]], false);
    let words = q.device_words();
    for i in 0..q.numel() {
        assert_eq!(
            ((words[i / 8] as u32) >> (4 * (i % 8))) & 0xF,
            q.code(i) as u32
        );
    }
}
