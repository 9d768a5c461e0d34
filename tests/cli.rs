//! The command-line contract: `score` and `generate --json` output, and one-line errors with a
//! non-zero exit for every kind of bad input.

mod common;

use common::{assert_one_line_error, copy_fixture, fixtures, phitune, scratch, stderr, stdout};

fn tiny() -> String {
    fixtures().join("tiny-phi").display().to_string()
}

#[test]
fn score_prints_one_json_object_matching_hf() {
    let exp = common::expected();
    let case = &exp["tiny-phi"]["score"][1];
    let o = phitune(&[
        "score",
        "--model",
        &tiny(),
        "--text",
        case["text"].as_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["tokens"], case["tokens"]);
    let nll = v["nll"].as_array().unwrap();
    let want = case["nll"].as_array().unwrap();
    assert_eq!(nll.len(), want.len());
    let mut total = 0.0;
    for (a, b) in nll.iter().zip(want) {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        total += a;
    }
    assert!((v["total_nll"].as_f64().unwrap() - total).abs() < 1e-6);
    assert!((v["mean_nll"].as_f64().unwrap() - total / nll.len() as f64).abs() < 1e-6);
}

#[test]
fn generate_json_matches_hf_greedy() {
    let exp = common::expected();
    for name in ["tiny-phi", "tiny-phi-alt"] {
        let case = &exp[name]["greedy"][0];
        let dir = fixtures().join(name).display().to_string();
        let max = case["max_new_tokens"].as_u64().unwrap().to_string();
        let o = phitune(&[
            "generate",
            "--model",
            &dir,
            "--prompt",
            case["prompt"].as_str().unwrap(),
            "--temperature",
            "0",
            "--max-new-tokens",
            &max,
            "--json",
        ]);
        assert!(o.status.success(), "{}", common::stderr(&o));
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        assert_eq!(v["tokens"], case["new_tokens"], "{name}");
        assert!(v["text"].as_str().is_some());
    }
    // The seed's generation setting (repetition penalty 1.2).
    let case = &exp["tiny-phi"]["greedy"][3];
    assert_eq!(case["repetition_penalty"].as_f64(), Some(1.2));
    let o = phitune(&[
        "generate",
        "--model",
        &tiny(),
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--max-new-tokens",
        "24",
        "--repetition-penalty",
        "1.2",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["tokens"], case["new_tokens"]);
}

/// `--max-new-tokens` past the model's context stops at the context and says so; a prompt that
/// alone fills the context is refused.
#[test]
fn generate_stops_at_the_models_context() {
    let dir = copy_fixture("tiny-phi", "tiny-phi-48-positions");
    let config = dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["max_position_embeddings"] = 48.into();
    std::fs::write(&config, c.to_string()).unwrap();
    let model = dir.display().to_string();
    let prompt = "i have a dog named";
    let o = phitune(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--repetition-penalty",
        "1.3",
        "--max-new-tokens",
        "100000",
        "--json",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let err = common::stderr(&o);
    assert!(
        err.contains("--max-new-tokens 100000: generating at most"),
        "{err}"
    );
    assert!(err.contains("context of 48 positions"), "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let prompt_len: usize = err
        .split("the prompt (")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the prompt's length on stderr");
    let new = v["tokens"].as_array().unwrap().len();
    assert!(
        new >= 1 && prompt_len + new <= 48,
        "{prompt_len} + {new} tokens"
    );
    let long = "i have a dog named max and he likes to run in the park every day ".repeat(4);
    assert_one_line_error(
        &phitune(&["generate", "--model", &model, "--prompt", &long]),
        "the model's context is 48 positions",
    );
}

#[test]
fn generate_streams_text() {
    let o = phitune(&[
        "generate",
        "--model",
        &tiny(),
        "--prompt",
        "i have a dog named",
        "--max-new-tokens",
        "8",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let json = phitune(&[
        "generate",
        "--model",
        &tiny(),
        "--prompt",
        "i have a dog named",
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(stdout(&json).trim()).unwrap();
    assert_eq!(
        stdout(&o).trim_end_matches('\n'),
        v["text"].as_str().unwrap()
    );
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let run = |seed: &str| {
        let o = phitune(&[
            "generate",
            "--model",
            &tiny(),
            "--prompt",
            "my favorite food is",
            "--temperature",
            "1.5",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--max-new-tokens",
            "16",
            "--json",
        ]);
        assert!(o.status.success(), "{}", common::stderr(&o));
        serde_json::from_str::<serde_json::Value>(stdout(&o).trim()).unwrap()["tokens"].clone()
    };
    assert_eq!(run("1"), run("1"));
    assert_ne!(run("1"), run("2"));
}

#[test]
fn bad_flags() {
    assert_one_line_error(
        &phitune(&["score", "--model", &tiny(), "--txt", "hi"]),
        "--txt",
    );
    assert_one_line_error(&phitune(&["score", "--model", &tiny()]), "--text");
    assert_one_line_error(&phitune(&["frobnicate"]), "frobnicate");
    assert_one_line_error(
        &phitune(&[
            "generate",
            "--model",
            &tiny(),
            "--prompt",
            "x",
            "--temperature=-1",
        ]),
        "--temperature",
    );
    assert_one_line_error(
        &phitune(&[
            "generate",
            "--model",
            &tiny(),
            "--prompt",
            "x",
            "--top-p",
            "1.5",
        ]),
        "--top-p",
    );
    assert_one_line_error(
        &phitune(&[
            "score",
            "--model",
            &tiny(),
            "--text",
            "hi",
            "--device",
            "tpu",
        ]),
        "tpu",
    );
    assert_one_line_error(
        &phitune(&[
            "score",
            "--model",
            &tiny(),
            "--text",
            "hi",
            "--dtype",
            "bf16",
            "--device",
            "cpu",
        ]),
        "dtype",
    );
    assert_one_line_error(
        &phitune(&["score", "--model", &tiny(), "--text", "i"]),
        "at least 2",
    );
}

#[test]
fn missing_model_and_bad_hub_ids() {
    assert_one_line_error(
        &phitune(&["score", "--model", "./no/such/dir", "--text", "a b"]),
        "no such model directory",
    );
    assert_one_line_error(
        &phitune(&[
            "score",
            "--model",
            "../../no-such-dir/model",
            "--text",
            "a b",
        ]),
        "no such model directory",
    );
    // A valid hub id with the network forbidden and an empty cache.
    assert_one_line_error(
        &phitune(&["score", "--model", "microsoft/phi-2", "--text", "a b"]),
        "HF_HUB_OFFLINE",
    );
    let file = fixtures()
        .join("tiny-phi/config.json")
        .display()
        .to_string();
    assert_one_line_error(
        &phitune(&["score", "--model", &file, "--text", "a b"]),
        "not a file",
    );
}

/// Runs the binary online (HF_HUB_OFFLINE unset) against a hub at `endpoint`, with an empty
/// cache.
fn phitune_with_endpoint(args: &[&str], endpoint: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_phitune"))
        .args(args)
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_HOME", scratch("hf-home-unreachable"))
        .env("HF_ENDPOINT", endpoint)
        .output()
        .expect("run phitune")
}

/// A hub that cannot be reached (nothing listens; a name that never resolves) and a model or
/// data set that is not in the cache: one line that says so and gives the fix, not the HTTP
/// client's message.
#[test]
fn an_unreachable_hub_is_explained() {
    let data = fixtures().join("../../data/samples/persona_chat_sample.jsonl");
    let data = data.display().to_string();
    for endpoint in ["http://127.0.0.1:9", "http://hub.invalid"] {
        let o = phitune_with_endpoint(&["data", "--data", &data], endpoint);
        assert_one_line_error(&o, "microsoft/phi-2 is not in the HF cache");
        let err = stderr(&o);
        assert!(
            err.contains("the hub is unreachable") && err.contains("pass --model DIR, or connect"),
            "{err}"
        );
        let tiny = fixtures().join("tiny-phi").display().to_string();
        let o = phitune_with_endpoint(
            &["data", "--model", &tiny, "--data", "someone/persona-rows"],
            endpoint,
        );
        assert_one_line_error(&o, "someone/persona-rows is not in the HF cache");
        assert!(
            stderr(&o).contains("pass --data FILE or DIR, or connect"),
            "{}",
            stderr(&o)
        );
    }
}

fn score_dir(dir: &std::path::Path) -> std::process::Output {
    phitune(&[
        "score",
        "--model",
        &dir.display().to_string(),
        "--text",
        "hello there friend",
    ])
}

#[test]
fn bad_config() {
    let dir = copy_fixture("tiny-phi", "bad-config");
    let cfg = dir.join("config.json");
    let orig = std::fs::read_to_string(&cfg).unwrap();
    let cases = [
        (
            orig.replace("\"gelu_new\"", "\"swiglu\""),
            "hidden_act \"swiglu\"",
        ),
        (
            orig.replace(
                "\"partial_rotary_factor\": 0.4",
                "\"partial_rotary_factor\": 0.33",
            ),
            "rotary dim",
        ),
        (
            orig.replace("\"hidden_size\": 160", "\"hidden_size\": \"160\""),
            "hidden_size",
        ),
        (
            orig.replace("\"num_attention_heads\": 2", "\"num_attention_heads\": 3"),
            "not divisible",
        ),
        ("{ not json".to_string(), "invalid config"),
    ];
    for (text, want) in cases {
        std::fs::write(&cfg, text).unwrap();
        let o = score_dir(&dir);
        assert_one_line_error(&o, want);
        assert!(
            common::stderr(&o).contains("config.json"),
            "{}",
            common::stderr(&o)
        );
    }
    std::fs::remove_file(&cfg).unwrap();
    assert_one_line_error(&score_dir(&dir), "no config.json");
}

#[test]
fn wrong_shapes_and_missing_tensors() {
    // A config that disagrees with the weights: every tensor's shape changes.
    let dir = copy_fixture("tiny-phi", "wrong-shape");
    let cfg = dir.join("config.json");
    let orig = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        orig.replace("\"intermediate_size\": 640", "\"intermediate_size\": 320"),
    )
    .unwrap();
    let o = score_dir(&dir);
    assert_one_line_error(
        &o,
        "mlp.fc1.weight has shape [640, 160], config.json implies [320, 160]",
    );
    // One layer more than the checkpoint has.
    std::fs::write(
        &cfg,
        orig.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"),
    )
    .unwrap();
    assert_one_line_error(
        &score_dir(&dir),
        "tensor model.layers.2.input_layernorm.weight is missing",
    );
    // One layer fewer: the checkpoint has tensors the model does not.
    std::fs::write(
        &cfg,
        orig.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1"),
    )
    .unwrap();
    assert_one_line_error(&score_dir(&dir), "unexpected tensor model.layers.1");
}

#[test]
fn corrupt_and_missing_weights() {
    let dir = copy_fixture("tiny-phi", "corrupt");
    let shard = dir.join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    // Truncated: the header's offsets point past the end of the file.
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let o = score_dir(&dir);
    assert_one_line_error(&o, "model-00002-of-00002.safetensors");
    assert!(
        common::stderr(&o).contains("outside"),
        "{}",
        common::stderr(&o)
    );
    // Garbage instead of a header.
    std::fs::write(&shard, b"this is not a safetensors file at all").unwrap();
    assert_one_line_error(&score_dir(&dir), "not a valid safetensors file");
    // A shard listed in the index is gone.
    std::fs::remove_file(&shard).unwrap();
    assert_one_line_error(
        &score_dir(&dir),
        "refers to missing shard model-00002-of-00002.safetensors",
    );
    // An index pointing outside the directory.
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    std::fs::write(
        &index,
        text.replace(
            "\"model-00002-of-00002.safetensors\"",
            "\"../../x.safetensors\"",
        ),
    )
    .unwrap();
    assert_one_line_error(
        &score_dir(&dir),
        "not a .safetensors file name in this directory",
    );
    // No weights at all, only a pickle.
    std::fs::remove_file(&index).unwrap();
    std::fs::remove_file(dir.join("model-00001-of-00002.safetensors")).unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"PK\x03\x04 pickle").unwrap();
    assert_one_line_error(&score_dir(&dir), "safetensors only");
}

#[test]
fn bad_tokenizer() {
    let dir = copy_fixture("tiny-phi", "bad-tokenizer");
    std::fs::write(dir.join("tokenizer.json"), "{\"version\": 1}").unwrap();
    assert_one_line_error(&score_dir(&dir), "invalid tokenizer.json");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    assert_one_line_error(&score_dir(&dir), "no tokenizer.json");
}

#[test]
fn help_lists_commands() {
    let o = phitune(&["--help"]);
    assert!(o.status.success());
    let out = stdout(&o);
    for c in ["score", "generate", "bench"] {
        assert!(out.contains(c), "{out}");
    }
    let _ = scratch("unused");
}

#[test]
fn score_quant_nf4_matches_bitsandbytes_reference() {
    let exp = common::expected();
    let case = &exp["nf4"]["tiny-phi"]["double_quant"][0];
    let o = phitune(&[
        "score",
        "--model",
        &tiny(),
        "--quant",
        "nf4",
        "--text",
        case["text"].as_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    for (g, w) in v["nll"]
        .as_array()
        .unwrap()
        .iter()
        .zip(case["nll"].as_array().unwrap())
    {
        assert!((g.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 5e-3);
    }
    assert_one_line_error(
        &phitune(&[
            "score",
            "--model",
            &tiny(),
            "--quant",
            "nf8",
            "--text",
            "a b",
        ]),
        "nf8",
    );
}

#[test]
fn bench_generation_times_the_base_it_is_asked_for() {
    let tiny = tiny();
    let bench = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "bench",
            "--device",
            "cpu",
            "--model",
            &tiny,
            "--prompt-len",
            "4",
            "--new-tokens",
            "3",
            "--repeats",
            "1",
        ];
        args.extend_from_slice(extra);
        let o = phitune(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str(stdout(&o).trim()).unwrap()
    };
    // tiny-phi: 2 layers of q, k, v, dense, fc1, fc2.
    let float = bench(&[]);
    assert_eq!(float["quant"], "none", "{float}");
    assert_eq!(float["projections"], 12, "{float}");
    assert_eq!(float["nf4_projections"], 0, "{float}");
    assert_eq!(float["lora_projections"], 0, "{float}");
    assert!(float["lora"].is_null(), "{float}");
    let nf4 = bench(&["--quant", "nf4"]);
    assert_eq!(nf4["quant"], "nf4", "{nf4}");
    assert_eq!(nf4["nf4_projections"], 12, "{nf4}");
    assert_eq!(nf4["lora_projections"], 0, "{nf4}");
    // The train bench's adapter: q, k, v and dense in every layer.
    let qlora = bench(&["--quant", "nf4", "--lora"]);
    assert_eq!(qlora["nf4_projections"], 12, "{qlora}");
    assert_eq!(qlora["lora_projections"], 8, "{qlora}");
    assert_eq!(qlora["lora"]["r"], 4, "{qlora}");
    for v in [&float, &nf4, &qlora] {
        assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
    }
    assert_one_line_error(
        &phitune(&["bench", "--train", "--lora"]),
        "--lora is for the generation benchmark",
    );
}
