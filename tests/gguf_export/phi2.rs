//! A checkpoint of phi-2's geometry (one decoder layer, random fp16 weights) exported as q4_0:
//! every key llama.cpp's phi2 loader reads, every tensor's name, shape and type.

use super::*;

/// phi-2's own geometry (hidden 2560, 32 heads of 80 with 32 rotary dims, intermediate 10240,
/// a vocabulary of 51200 filled up from tiny-phi's 451 tokens) with one decoder layer, random
/// fp16 weights: the export's metadata says what llama.cpp's phi2 loader needs of that config,
/// every tensor has its name, shape and type, and the q4_0 blocks of the largest matrices are
/// those of the tiny-checked encoder ([`quantize`]) of the source values, within q4_0's bound.
/// (The 32-layer phi-2, 5.6 GB in f16, is checked with llama.cpp's reader by
/// `tests/fixtures/check_gguf.py`: docs/performance.md, "Exporting phi-2 to GGUF".)
#[test]
fn a_phi2_shaped_checkpoint_exports() {
    let dir = common::scratch("gguf-export-phi2-shaped");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let tiny = common::fixtures().join("tiny-phi");
    for f in [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(tiny.join(f), model.join(f)).unwrap();
    }
    let phi2: serde_json::Value =
        serde_json::from_str(include_str!("../../model/src/phi2_config.json")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tiny.join("config.json")).unwrap()).unwrap();
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        "partial_rotary_factor",
        "layer_norm_eps",
    ] {
        config[key] = phi2[key].clone();
    }
    config["num_hidden_layers"] = 1.into();
    std::fs::write(
        model.join("config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    let ckpt_config = phitune_model::PhiConfig::from_json(&config.to_string()).unwrap();
    let tensors = ckpt_config.expected_tensors();
    let entries: Vec<(String, Dtype, Vec<usize>)> = tensors
        .iter()
        .map(|(n, s)| (n.clone(), Dtype::F16, s.clone()))
        .collect();
    // Deterministic values of about a trained model's scale, a different stream per tensor.
    let values = |i: usize, n: usize| -> Vec<f32> {
        let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.08
            })
            .collect()
    };
    let mut w = StreamWriter::create(
        &model.join("model.safetensors"),
        &entries,
        &BTreeMap::from([("format".to_string(), "pt".to_string())]),
    )
    .unwrap();
    for (i, (name, shape)) in tensors.iter().enumerate() {
        let v = values(i, shape.iter().product());
        w.write_tensor(name, &f32_to_bytes(&v, Dtype::F16)).unwrap();
    }
    w.finish().unwrap();

    let out = dir.join("phi2-q4_0.gguf");
    let o = common::phitune(&[
        "export",
        "--model",
        model.to_str().unwrap(),
        "--type",
        "q4_0",
        "--out",
        out.to_str().unwrap(),
        "--overwrite",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let file = GgufFile::open(&out).unwrap();
    let u32_of = |k: &str| match file.get(k) {
        Some(Value::U32(v)) => *v as u64,
        other => panic!("{k}: {other:?}"),
    };
    for (key, want) in [
        ("phi2.context_length", 2048),
        ("phi2.embedding_length", 2560),
        ("phi2.feed_forward_length", 10240),
        ("phi2.block_count", 1),
        ("phi2.attention.head_count", 32),
        ("phi2.attention.head_count_kv", 32),
        ("phi2.rope.dimension_count", 32),
        ("general.file_type", 2),
        ("tokenizer.ggml.eos_token_id", 450),
    ] {
        assert_eq!(u32_of(key), want, "{key}");
    }
    match file.get("tokenizer.ggml.tokens") {
        Some(Value::Array(Array::String(t))) => {
            assert_eq!(t.len(), 51200);
            assert_eq!(t[451], "[PAD451]");
        }
        other => panic!("tokens: {other:?}"),
    }
    assert_eq!(file.tensors.len(), tensors.len());
    for (i, (hf, shape)) in tensors.iter().enumerate() {
        let name = phitune_model::export::gguf::gguf_name(hf).unwrap();
        let t = file
            .tensor(&name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(&t.info.shape, shape, "{name}");
        let want_ty = if shape.len() == 2 {
            GgmlType::Q4_0
        } else {
            GgmlType::F32
        };
        assert_eq!(t.info.ty, want_ty, "{name}");
        if !matches!(
            name.as_str(),
            "token_embd.weight" | "blk.0.ffn_down.weight" | "output.weight" | "output.bias"
        ) {
            continue;
        }
        // The source as the export read it: fp16 values.
        let src = phitune_model::io::safetensors::bytes_to_f32(
            &f32_to_bytes(&values(i, t.numel()), Dtype::F16),
            Dtype::F16,
        );
        if want_ty == GgmlType::F32 {
            assert_eq!(file.read_f32(&name).unwrap(), src, "{name}");
            continue;
        }
        assert!(
            file.read_raw(&name).unwrap() == quantize(&src, GgmlType::Q4_0).unwrap(),
            "{name}: blocks differ from the encoder's"
        );
        // q4_0 (16 levels, step = amax / 8, the extreme at -8 steps): each value within half a
        // step of its source, plus the f16 scale's rounding (8 steps x 2^-11); values beyond
        // 7.5 steps on the other side clip to +7 steps, within one step.
        let got = file.read_f32(&name).unwrap();
        for (b, (g, s)) in got.chunks(32).zip(src.chunks(32)).enumerate() {
            let amax = s.iter().fold(0f32, |m, x| m.max(x.abs()));
            let step = amax / 8.0;
            for (x, y) in g.iter().zip(s) {
                let bound = if y.abs() > 7.5 * step { 1.004 } else { 0.504 } * step;
                assert!(
                    (x - y).abs() <= bound + 1e-7,
                    "{name} block {b}: {x} for {y} (step {step})"
                );
            }
        }
    }
}
