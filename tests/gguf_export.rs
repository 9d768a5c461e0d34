//! `export --format gguf`: tiny-phi with a PEFT adapter merged in, written as GGUF for llama.cpp.
//!
//! `tests/fixtures/gguf/export.json` records what llama.cpp's own reader (the `gguf` package)
//! found in the files this command wrote (`make_fixtures.py --gguf-only`), after checking them
//! there against references computed in Python (the converter's tokenizer metadata, PEFT's
//! merge re-encoded by `gguf.quants.quantize`). Here, without Python: a fresh export holds
//! exactly that (every key and value, every tensor's name, shape, type and bytes); its values
//! are the merged checkpoint's, encoded; dequantized, it scores as the adapter on its base; the
//! Modelfile renders the training prompt; bad input is refused.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use phitune_model::io::adapter::Adapter;
use phitune_model::io::gguf::{Array, GgmlType, GgufFile, Value, dequantize, quantize};
use phitune_model::io::safetensors::{Dtype, StreamWriter, f32_to_bytes};
use phitune_model::{Checkpoint, Phi, PhiTokenizer};
use sha2::{Digest, Sha256};

type B = NdArray<f32>;

const TYPES: [&str; 4] = ["f16", "bf16", "q8_0", "q4_0"];

fn record() -> serde_json::Value {
    let p = common::fixtures().join("gguf/export.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

fn adapter_dir() -> PathBuf {
    common::fixtures().join(record()["adapter"].as_str().unwrap())
}

/// `phitune export` of tiny-phi + the fixture adapter as `dir/tiny-<ty>.gguf`.
fn export(dir: &Path, ty: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(format!("tiny-{ty}.gguf"));
    let tiny = common::fixtures().join("tiny-phi");
    let adapter = adapter_dir();
    let mut args = vec![
        "export",
        "--model",
        tiny.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
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

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A metadata value as `make_fixtures.py` recorded it: scalars as JSON, arrays of more than
/// 8 items as their length and sha256 (strings NUL-terminated, integers as i32 LE).
fn as_recorded(v: &Value) -> serde_json::Value {
    use serde_json::json;
    match v {
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::F32(x) => json!(*x as f64),
        Value::Bool(x) => json!(x),
        Value::String(s) => json!(s),
        Value::Array(Array::String(items)) if items.len() > 8 => {
            let bytes: Vec<u8> = items.iter().flat_map(|s| s.bytes().chain([0])).collect();
            json!({"len": items.len(), "sha256": sha256(&bytes)})
        }
        Value::Array(Array::I32(items)) if items.len() > 8 => {
            let bytes: Vec<u8> = items.iter().flat_map(|v| v.to_le_bytes()).collect();
            json!({"len": items.len(), "sha256": sha256(&bytes)})
        }
        other => panic!("unexpected metadata value {other:?}"),
    }
}

#[test]
fn export_holds_what_llama_cpps_reader_found() {
    let dir = common::scratch("gguf-export-read");
    let rec = record();
    for ty in TYPES {
        let want = &rec["types"][ty];
        let path = export(&dir, ty, &[]);
        let file = GgufFile::open(&path).unwrap();
        let got: BTreeMap<String, serde_json::Value> = file
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), as_recorded(v)))
            .collect();
        let expected: BTreeMap<String, serde_json::Value> = want["metadata"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{ty}: metadata keys"
        );
        for (k, v) in &expected {
            assert_eq!(&got[k], v, "{ty}: {k}");
        }
        let tensors = want["tensors"].as_array().unwrap();
        assert_eq!(file.tensors.len(), tensors.len(), "{ty}: tensor count");
        for (t, w) in file.tensors.iter().zip(tensors) {
            assert_eq!(t.info.name, w["name"].as_str().unwrap(), "{ty}");
            // The record has ggml's order (ne[0] first), the reverse of PyTorch's.
            let ne: Vec<usize> = t.info.shape.iter().rev().copied().collect();
            let want_ne: Vec<usize> = w["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(ne, want_ne, "{ty}: {} shape", t.info.name);
            assert_eq!(
                t.info.ty.id() as u64,
                w["type"].as_u64().unwrap(),
                "{ty}: {} type",
                t.info.name
            );
            assert_eq!(
                sha256(&file.read_raw(&t.info.name).unwrap()),
                w["sha256"].as_str().unwrap(),
                "{ty}: {} bytes",
                t.info.name
            );
        }
    }
}

/// The merged checkpoint `merge --dtype f32` writes (every tensor in f32).
fn merged_checkpoint(dir: &Path) -> Checkpoint {
    let out = dir.join("merged-f32");
    let tiny = common::fixtures().join("tiny-phi");
    let adapter = adapter_dir();
    let o = common::phitune(&[
        "merge",
        "--model",
        tiny.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--dtype",
        "f32",
        "--out",
        out.to_str().unwrap(),
        "--overwrite",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    Checkpoint::open(&out).unwrap()
}

#[test]
fn export_values_are_the_merged_checkpoints_encoded() {
    let dir = common::scratch("gguf-export-values");
    let merged = merged_checkpoint(&dir);
    for ty in TYPES {
        let file = GgufFile::open(&export(&dir, ty, &[])).unwrap();
        let matrix_type = GgmlType::from_name(ty).unwrap();
        for (hf, shape) in merged.config().expected_tensors() {
            let name = phitune_model::export::gguf::gguf_name(&hf).unwrap();
            let t = file.tensor(&name).unwrap();
            assert_eq!(t.info.shape, shape, "{ty}: {name}");
            // Norms and biases stay f32, as llama.cpp's converter keeps them.
            let want_type = if shape.len() == 1 {
                GgmlType::F32
            } else {
                matrix_type
            };
            assert_eq!(t.info.ty, want_type, "{ty}: {name}");
            let values = merged.read_f32(&hf).unwrap().0;
            let raw = file.read_raw(&name).unwrap();
            assert!(
                raw == quantize(&values, want_type).unwrap(),
                "{ty}: {name} is not the merged weights encoded"
            );
            // Within the format's own bound of the merged values: half a step of the f16 /
            // bf16 grid; for q8_0 half a step d = amax / 127 per block, for q4_0 a whole step
            // d = amax / 8 (its codes run from -8 d to +7 d, so values of the other sign beyond
            // 7.5 d round to 7 d), each plus what storing d in f16 moves the extreme codes.
            let got = dequantize(&raw, want_type, values.len()).unwrap();
            let block = want_type.block_size().max(1);
            for (b, (g, v)) in got.chunks(block).zip(values.chunks(block)).enumerate() {
                let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                let scale_error = |d: f32, codes: f32| {
                    codes * (d - half::f16::from_f32(d).to_f32()).abs() + amax * 2f32.powi(-20)
                };
                let bound = match want_type {
                    GgmlType::F32 => 0.0,
                    GgmlType::F16 => amax * 2f32.powi(-11) + 6e-8,
                    GgmlType::BF16 => amax * 2f32.powi(-8),
                    GgmlType::Q8_0 => amax / 127.0 / 2.0 + scale_error(amax / 127.0, 127.0),
                    GgmlType::Q4_0 => amax / 8.0 + scale_error(amax / 8.0, 8.0),
                };
                for (x, y) in g.iter().zip(v) {
                    assert!(
                        (x - y).abs() <= bound,
                        "{ty}: {name} block {b}: {x} vs {y} (bound {bound})"
                    );
                }
            }
        }
    }
}

/// Writes the GGUF file's weights, dequantized, as an f32 HF checkpoint (tiny-phi's config and
/// tokenizer) and loads it.
fn dequantized_model(file: &GgufFile, dir: &Path) -> (Phi<B>, PhiTokenizer) {
    let tiny = common::fixtures().join("tiny-phi");
    let base = Checkpoint::open(&tiny).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(tiny.join(f), dir.join(f)).unwrap();
    }
    let tensors = base.config().expected_tensors();
    let entries: Vec<(String, Dtype, Vec<usize>)> = tensors
        .iter()
        .map(|(n, s)| (n.clone(), Dtype::F32, s.clone()))
        .collect();
    let mut w = StreamWriter::create(
        &dir.join("model.safetensors"),
        &entries,
        &BTreeMap::from([("format".to_string(), "pt".to_string())]),
    )
    .unwrap();
    for (hf, _) in &tensors {
        let name = phitune_model::export::gguf::gguf_name(hf).unwrap();
        let values = file.read_f32(&name).unwrap();
        w.write_tensor(hf, &f32_to_bytes(&values, Dtype::F32))
            .unwrap();
    }
    w.finish().unwrap();
    let ckpt = Checkpoint::open(dir).unwrap();
    let tok = PhiTokenizer::from_dir(dir, ckpt.config()).unwrap();
    (Phi::load(&ckpt, &Default::default()).unwrap(), tok)
}

fn all_nll(model: &Phi<B>, tok: &PhiTokenizer) -> Vec<f32> {
    common::expected()["tiny-phi"]["score"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| {
            model.token_nll(
                &tok.encode(c["text"].as_str().unwrap()).unwrap(),
                &Default::default(),
            )
        })
        .collect()
}

#[test]
fn dequantized_export_scores_as_the_adapter_on_its_base() {
    let dir = common::scratch("gguf-export-nll");
    let tiny = common::fixtures().join("tiny-phi");
    let base = Checkpoint::open(&tiny).unwrap();
    let tok = PhiTokenizer::from_dir(&tiny, base.config()).unwrap();
    let adapted: Phi<B> = Phi::load(&base, &Default::default())
        .unwrap()
        .with_adapter(&Adapter::read(&adapter_dir()).unwrap(), &Default::default())
        .unwrap();
    let want = all_nll(&adapted, &tok);
    // (mean, max) |NLL difference| per token allowed: f16 within 1e-3 nats per token on
    // average (its rounding of the merged weights: 3e-4 measured, 1.6e-3 at worst); q8_0
    // measured 0.015 / 0.061 nats (make_fixtures.py, PEFT's reference); the bounds below are
    // those measurements with a margin, and q4_0 is only reported (0.24 / 0.90 measured).
    for (ty, bound) in [
        ("f16", Some((1e-3, 5e-3))),
        ("bf16", Some((1e-2, 5e-2))),
        ("q8_0", Some((0.03, 0.12))),
        ("q4_0", None),
    ] {
        let file = GgufFile::open(&export(&dir, ty, &[])).unwrap();
        let (model, tok) = dequantized_model(&file, &dir.join(format!("hf-{ty}")));
        let got = all_nll(&model, &tok);
        assert_eq!(got.len(), want.len());
        let diffs: Vec<f32> = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).collect();
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        let max = diffs.iter().fold(0f32, |m, d| m.max(*d));
        eprintln!("{ty}: |NLL - adapter's| per token: mean {mean:.2e}, max {max:.2e}");
        if let Some((mean_bound, max_bound)) = bound {
            assert!(
                mean < mean_bound,
                "{ty}: mean |dNLL| {mean} (bound {mean_bound})"
            );
            assert!(
                max < max_bound,
                "{ty}: max |dNLL| {max} (bound {max_bound})"
            );
        }
        // Quantizing must cost something measurable, or the comparison above proves nothing.
        assert!(max > 0.0, "{ty}: identical NLLs");
    }
}

/// Renders the subset of Go's text/template the Modelfile's TEMPLATE uses, as Ollama does:
/// `{{ .System }}`, `{{ range .Messages }}..{{ end }}` over (role, content), `{{ if ne .Role
/// "system" }}..{{ end }}`, `{{ .Content }}`, and the seed template's `$first` variable.
fn render(template: &str, system: &str, messages: &[(&str, &str)]) -> String {
    #[derive(Debug)]
    enum Node {
        Text(String),
        System,
        Content,
        First(bool),
        Range(Vec<Node>),
        IfNotSystem(Vec<Node>),
        IfNotFirst(Vec<Node>),
    }
    fn parse(tokens: &mut std::iter::Peekable<std::vec::IntoIter<String>>) -> Vec<Node> {
        let mut out = Vec::new();
        while let Some(t) = tokens.next() {
            let Some(action) = t.strip_prefix("{{").and_then(|a| a.strip_suffix("}}")) else {
                out.push(Node::Text(t));
                continue;
            };
            match action.trim() {
                ".System" => out.push(Node::System),
                ".Content" => out.push(Node::Content),
                "$first := true" => out.push(Node::First(true)),
                "$first = false" => out.push(Node::First(false)),
                "range .Messages" => out.push(Node::Range(parse(tokens))),
                "if ne .Role \"system\"" => out.push(Node::IfNotSystem(parse(tokens))),
                "if not $first" => out.push(Node::IfNotFirst(parse(tokens))),
                "end" => return out,
                other => panic!("template action {other:?} is not one this renderer knows"),
            }
        }
        out
    }
    struct State<'a> {
        out: String,
        system: &'a str,
        first: bool,
    }
    fn run(nodes: &[Node], s: &mut State, msg: Option<(&str, &str)>, msgs: &[(&str, &str)]) {
        for n in nodes {
            match n {
                Node::Text(t) => s.out += t,
                Node::System => s.out += s.system,
                Node::Content => s.out += msg.unwrap().1,
                Node::First(v) => s.first = *v,
                Node::Range(body) => {
                    for m in msgs {
                        run(body, s, Some(*m), msgs);
                    }
                }
                Node::IfNotSystem(body) => {
                    if msg.unwrap().0 != "system" {
                        run(body, s, msg, msgs);
                    }
                }
                Node::IfNotFirst(body) => {
                    if !s.first {
                        run(body, s, msg, msgs);
                    }
                }
            }
        }
    }
    let mut tokens = Vec::new();
    let mut rest = template;
    while let Some(i) = rest.find("{{") {
        if i > 0 {
            tokens.push(rest[..i].to_string());
        }
        let j = rest[i..].find("}}").unwrap() + i + 2;
        tokens.push(rest[i..j].to_string());
        rest = &rest[j..];
    }
    if !rest.is_empty() {
        tokens.push(rest.to_string());
    }
    let nodes = parse(&mut tokens.into_iter().peekable());
    let mut s = State {
        out: String::new(),
        system,
        first: true,
    };
    run(&nodes, &mut s, None, messages);
    s.out
}

fn modelfile_field<'a>(text: &'a str, key: &str) -> &'a str {
    let start = text.find(&format!("{key} \"\"\"")).unwrap() + key.len() + 4;
    let end = text[start..].find("\"\"\"").unwrap() + start;
    &text[start..end]
}

#[test]
fn modelfile_renders_the_training_prompt() {
    let dir = common::scratch("gguf-export-modelfile");
    let persona = ["i love hiking.", "my dog is called rex."];
    let dialogue = [
        "hi there, how are you?",
        "great, just back from a walk.",
        "where did you go?",
    ];
    for template in [
        phitune_data::Template::Persona,
        phitune_data::Template::Seed,
    ] {
        let name = template.to_string();
        let path = export(
            &dir,
            "q8_0",
            &[
                "--persona",
                persona[0],
                "--persona",
                persona[1],
                "--template",
                &name,
            ],
        );
        let text = std::fs::read_to_string(dir.join("Modelfile")).unwrap();
        assert!(
            text.contains(&format!(
                "FROM ./{}",
                path.file_name().unwrap().to_str().unwrap()
            )),
            "{text}"
        );
        assert!(text.contains("PARAMETER stop \"<|endoftext|>\""), "{text}");
        let system = modelfile_field(&text, "SYSTEM");
        assert_eq!(system, persona.join(" "));
        // Ollama's messages: the persona as the system message, then the dialogue's turns,
        // alternately the user's and the model's.
        let mut msgs = vec![("system", system)];
        for (i, t) in dialogue.iter().enumerate() {
            msgs.push((if i % 2 == 0 { "user" } else { "assistant" }, t));
        }
        let rendered = render(modelfile_field(&text, "TEMPLATE"), system, &msgs);
        let persona: Vec<String> = persona.iter().map(|s| s.to_string()).collect();
        let dialogue: Vec<String> = dialogue.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            rendered,
            template.prompt_text(&persona, &dialogue),
            "{name} template"
        );
    }
}

#[test]
fn export_refuses_bad_input_with_one_line() {
    let dir = common::scratch("gguf-export-refusals");
    let tiny = common::fixtures().join("tiny-phi");
    let alt = common::fixtures().join("tiny-phi-alt");
    let adapter = adapter_dir();
    let out = dir.join("x.gguf");
    let (tiny, alt, adapter, out_s) = (
        tiny.to_str().unwrap(),
        alt.to_str().unwrap(),
        adapter.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let refused = |args: &[&str], needle: &str| {
        let o = common::phitune(args);
        let err = common::stderr(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    // qk_layernorm: llama.cpp's phi2 graph has none.
    refused(&["export", "--model", alt, "--out", out_s], "qk_layernorm");
    // An adapter trained for another shape.
    refused(
        &[
            "export",
            "--model",
            alt,
            "--adapter",
            adapter,
            "--out",
            out_s,
        ],
        "adapter",
    );
    refused(
        &["export", "--model", tiny, "--type", "q5_k", "--out", out_s],
        "q5_k",
    );
    refused(
        &[
            "export",
            "--model",
            tiny,
            "--out",
            dir.join("x.bin").to_str().unwrap(),
        ],
        ".gguf",
    );
    refused(
        &[
            "export",
            "--model",
            tiny,
            "--adapter",
            adapter,
            "--format",
            "hf",
            "--type",
            "q4_0",
            "--out",
            out_s,
        ],
        "q4_0",
    );
    // An eos id without a token: refused before anything is written (no GGUF without its
    // Modelfile).
    let no_eos = dir.join("no-eos");
    std::fs::create_dir_all(&no_eos).unwrap();
    for entry in std::fs::read_dir(tiny).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_owned();
        let text = std::fs::read(&path).unwrap();
        let text = if name == "config.json" || name == "generation_config.json" {
            let mut v: serde_json::Value = serde_json::from_slice(&text).unwrap();
            v["eos_token_id"] = 500.into();
            serde_json::to_vec(&v).unwrap()
        } else {
            text
        };
        std::fs::write(no_eos.join(name), text).unwrap();
    }
    refused(
        &[
            "export",
            "--model",
            no_eos.to_str().unwrap(),
            "--out",
            out_s,
        ],
        "eos token id 500",
    );
    assert!(!out.exists() && !dir.join("Modelfile").exists());
    std::fs::remove_dir_all(&no_eos).unwrap();
    refused(
        &[
            "export",
            "--model",
            tiny,
            "--out",
            dir.join("missing/x.gguf").to_str().unwrap(),
        ],
        "does not exist",
    );
    // An existing file is kept unless --overwrite.
    std::fs::write(&out, b"mine").unwrap();
    refused(&["export", "--model", tiny, "--out", out_s], "--overwrite");
    assert_eq!(std::fs::read(&out).unwrap(), b"mine");
    assert!(!dir.join("Modelfile").exists());
    // The base alone exports (no adapter), replacing it with --overwrite.
    let o = common::phitune(&["export", "--model", tiny, "--out", out_s, "--overwrite"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(
        common::stderr(&o).contains("ollama create x -f"),
        "{}",
        common::stderr(&o)
    );
    let file = GgufFile::open(&out).unwrap();
    assert_eq!(
        file.get("general.architecture"),
        Some(&Value::String("phi2".into()))
    );
    // Nothing but the two outputs is left behind (no temporary file).
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["Modelfile", "x.gguf"]);
}

#[path = "gguf_export/phi2.rs"]
mod phi2;
