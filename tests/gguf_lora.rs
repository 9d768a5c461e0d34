//! `export --format gguf-lora`: the adapter alone as llama.cpp's GGUF LoRA.
//!
//! `tests/fixtures/gguf/lora-peft-qkvd-r4.gguf` was written by this command and checked with
//! llama.cpp's own reader (`check_gguf_lora.py`, the `gguf` package): keys, shapes, and
//! `alpha / r * B A` equal to PEFT's delta. Here, without Python: a fresh export is that file
//! byte for byte; read back by our reader, every pair gives the adapter's delta (rsLoRA, rank and
//! alpha patterns folded into B); a base with fused q/k/v gets fused pairs; bad input is refused.

mod common;

use std::path::{Path, PathBuf};

use phitune_model::Checkpoint;
use phitune_model::export::lora_gguf::{QkvLayout, base_layout};
use phitune_model::io::adapter::{Adapter, module_path};
use phitune_model::io::gguf::{GgmlType, GgufFile, GgufWriter, TensorInfo, Value, quantize};

fn tiny() -> PathBuf {
    common::fixtures().join("tiny-phi")
}

fn adapter(name: &str) -> PathBuf {
    common::fixtures().join("adapters").join(name)
}

/// `phitune export --format gguf-lora`; the written file.
fn export(dir: &Path, adapter_name: &str, ty: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(format!("{adapter_name}-{ty}.gguf"));
    let (tiny, a) = (tiny(), adapter(adapter_name));
    let mut args = vec![
        "export",
        "--model",
        tiny.to_str().unwrap(),
        "--adapter",
        a.to_str().unwrap(),
        "--format",
        "gguf-lora",
        "--type",
        ty,
        "--out",
        out.to_str().unwrap(),
        "--overwrite",
    ];
    args.extend_from_slice(extra);
    let o = common::phitune(&args);
    assert!(o.status.success(), "{}", common::stderr(&o));
    out
}

fn text(f: &GgufFile, key: &str) -> String {
    match f.get(key) {
        Some(Value::String(s)) => s.clone(),
        v => panic!("{key}: {v:?}"),
    }
}

/// `alpha / r * B A` of one pair, `[out, in]` row-major, in f64.
fn pair_delta(f: &GgufFile, base: &str) -> (Vec<f64>, usize, usize) {
    let Some(Value::F32(alpha)) = f.get("adapter.lora.alpha") else {
        panic!("adapter.lora.alpha must be an f32")
    };
    let (ta, tb) = (
        f.tensor(&format!("{base}.lora_a")).unwrap(),
        f.tensor(&format!("{base}.lora_b")).unwrap(),
    );
    let (r, d_in) = (ta.info.shape[0], ta.info.shape[1]);
    let d_out = tb.info.shape[0];
    assert_eq!(tb.info.shape[1], r, "{base}: ranks of A and B");
    let a = f.read_f32(&format!("{base}.lora_a")).unwrap();
    let b = f.read_f32(&format!("{base}.lora_b")).unwrap();
    let scale = *alpha as f64 / r as f64;
    let mut out = vec![0f64; d_out * d_in];
    for o in 0..d_out {
        for k in 0..r {
            let bk = b[o * r + k] as f64 * scale;
            for i in 0..d_in {
                out[o * d_in + i] += bk * a[k * d_in + i] as f64;
            }
        }
    }
    (out, d_out, d_in)
}

fn assert_close(got: &[f64], want: &[f32], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let max = want
        .iter()
        .fold(0f64, |m, &v| m.max(v.abs() as f64))
        .max(1e-12);
    let worst = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g - w as f64).abs()));
    assert!(worst / max <= rel, "{what}: {worst} of {max}");
    assert!(max > 1e-6, "{what}: a zero delta proves nothing");
}

#[test]
fn a_fresh_export_is_the_file_llama_cpps_reader_checked() {
    let dir = common::scratch("gguf-lora-fixture");
    let out = export(
        &dir,
        "peft-qkvd-r4",
        "f16",
        &["--name", "lora-peft-qkvd-r4"],
    );
    let want = std::fs::read(common::fixtures().join("gguf/lora-peft-qkvd-r4.gguf")).unwrap();
    assert!(
        std::fs::read(&out).unwrap() == want,
        "differs from the checked fixture"
    );
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(text(&f, "general.type"), "adapter");
    assert_eq!(text(&f, "general.architecture"), "phi2");
    assert_eq!(text(&f, "adapter.type"), "lora");
    assert_eq!(f.get("adapter.lora.alpha"), Some(&Value::F32(16.0)));
    assert_eq!(
        f.tensors.len(),
        2 * 4 * 2,
        "2 layers x q/k/v/dense x (a, b)"
    );
    for t in &f.tensors {
        assert_eq!(t.info.ty, GgmlType::F16, "{}", t.info.name);
    }
    // The Modelfile applies it over Ollama's phi-2 when no base GGUF is named.
    let modelfile = std::fs::read_to_string(dir.join("Modelfile")).unwrap();
    assert!(modelfile.contains("\nFROM phi\n"), "{modelfile}");
    assert!(
        modelfile.contains("\nADAPTER ./peft-qkvd-r4-f16.gguf\n"),
        "{modelfile}"
    );
    assert!(
        modelfile.contains("TEMPLATE \"\"\"Instruct: Given this persona:"),
        "{modelfile}"
    );
}

#[test]
fn every_pair_is_the_adapters_delta_with_rslora_and_patterns_folded_into_b() {
    let dir = common::scratch("gguf-lora-deltas");
    // peft-all-r8: all six modules, rsLoRA, a rank_pattern and an alpha_pattern.
    let ad = Adapter::read(&adapter("peft-all-r8")).unwrap();
    assert!(ad.config.use_rslora && !ad.config.rank_pattern.is_empty());
    for (ty, rel) in [("f32", 1e-6), ("f16", 2e-3)] {
        let f = GgufFile::open(&export(&dir, "peft-all-r8", ty, &[])).unwrap();
        assert_eq!(f.tensors.len(), 2 * ad.modules.len(), "{ty}");
        for (path, w) in &ad.modules {
            let base = phitune_model::export::gguf::gguf_name(&format!("{path}.weight")).unwrap();
            let (got, d_out, d_in) = pair_delta(&f, &base);
            assert_eq!((d_out, d_in), (w.d_out, w.d_in), "{base}");
            assert_close(&got, &w.delta(), rel, &format!("{ty} {base}"));
        }
    }
}

/// A phi2 GGUF header with fused q/k/v (zero weights: only names and shapes matter here).
fn fused_base(path: &Path) {
    let ckpt = Checkpoint::open(&tiny()).unwrap();
    let c = ckpt.config();
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), "phi2".into()),
        (
            "phi2.block_count".into(),
            Value::U32(c.num_hidden_layers as u32),
        ),
        (
            "phi2.embedding_length".into(),
            Value::U32(c.hidden_size as u32),
        ),
    ];
    let h = c.hidden_size;
    let infos: Vec<TensorInfo> = (0..c.num_hidden_layers)
        .map(|l| {
            TensorInfo::new(
                format!("blk.{l}.attn_qkv.weight"),
                &[3 * h, h],
                GgmlType::F32,
            )
        })
        .collect();
    let file = std::fs::File::create(path).unwrap();
    let mut w = GgufWriter::new(file, path, &meta, &infos).unwrap();
    for i in &infos {
        w.write_tensor(
            &i.name,
            &quantize(&vec![0f32; 3 * h * h], GgmlType::F32).unwrap(),
        )
        .unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn a_base_with_fused_qkv_gets_one_pair_per_layer_whose_rows_are_q_k_v() {
    let dir = common::scratch("gguf-lora-fused");
    let base = dir.join("base-fused.gguf");
    fused_base(&base);
    let ckpt = Checkpoint::open(&tiny()).unwrap();
    assert_eq!(base_layout(&base, ckpt.config()).unwrap(), QkvLayout::Fused);
    let out = export(
        &dir,
        "peft-all-r8",
        "f32",
        &["--base-gguf", base.to_str().unwrap()],
    );
    let f = GgufFile::open(&out).unwrap();
    let ad = Adapter::read(&adapter("peft-all-r8")).unwrap();
    let h = ckpt.config().hidden_size;
    for layer in 0..ckpt.config().num_hidden_layers {
        assert!(
            f.tensor(&format!("blk.{layer}.attn_q.weight.lora_a"))
                .is_none()
        );
        let (got, d_out, d_in) = pair_delta(&f, &format!("blk.{layer}.attn_qkv.weight"));
        assert_eq!((d_out, d_in), (3 * h, h));
        let mut want = Vec::new();
        for short in ["q_proj", "k_proj", "v_proj"] {
            match ad.modules.get(&module_path(layer, short)) {
                Some(w) => want.extend(w.delta()),
                None => want.extend(vec![0f32; h * h]),
            }
        }
        assert_close(&got, &want, 1e-6, &format!("layer {layer} qkv"));
        // dense and the MLP keep their own pairs.
        assert!(
            f.tensor(&format!("blk.{layer}.attn_output.weight.lora_b"))
                .is_some()
        );
    }
    let modelfile = std::fs::read_to_string(dir.join("Modelfile")).unwrap();
    let abs = std::fs::canonicalize(&base).unwrap();
    assert!(
        modelfile.contains(&format!("\nFROM {}\n", abs.display())),
        "{modelfile}"
    );
}

#[test]
fn gguf_lora_refuses_bad_input_with_one_line() {
    let dir = common::scratch("gguf-lora-bad");
    let (t, a) = (tiny(), adapter("peft-qkvd-r4"));
    let (t, a) = (t.to_str().unwrap(), a.to_str().unwrap());
    let out = dir.join("x.gguf");
    let out = out.to_str().unwrap();
    let o = common::phitune(&[
        "export",
        "--model",
        t,
        "--format",
        "gguf-lora",
        "--out",
        out,
    ]);
    common::assert_one_line_error(&o, "--adapter");
    let o = common::phitune(&[
        "export",
        "--model",
        t,
        "--adapter",
        a,
        "--format",
        "gguf-lora",
        "--type",
        "q8_0",
        "--out",
        out,
    ]);
    common::assert_one_line_error(&o, "q8_0");
    // A base GGUF that is itself an adapter, and a missing one.
    let lora = common::fixtures().join("gguf/lora-peft-qkvd-r4.gguf");
    for (base, want) in [
        (lora.to_str().unwrap(), "adapter"),
        ("no/such.gguf", "no/such.gguf"),
    ] {
        let o = common::phitune(&[
            "export",
            "--model",
            t,
            "--adapter",
            a,
            "--format",
            "gguf-lora",
            "--base-gguf",
            base,
            "--out",
            out,
        ]);
        common::assert_one_line_error(&o, want);
    }
    let o = common::phitune(&[
        "export",
        "--model",
        t,
        "--adapter",
        a,
        "--base-gguf",
        lora.to_str().unwrap(),
        "--out",
        out,
    ]);
    common::assert_one_line_error(&o, "--base-gguf is for --format gguf-lora");
    assert!(!Path::new(out).exists(), "nothing written");
}
