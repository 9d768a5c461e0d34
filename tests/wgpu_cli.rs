//! The whole CLI on a CubeCL backend (`--device wgpu`), on the tiny fixtures, against the same
//! references as the CPU: HF's per-token NLLs and greedy tokens, bitsandbytes' NF4 NLLs, and
//! the CPU's own training run (same data, same LoRA initialisation, same dropout masks). Runs
//! on Mesa's software Vulkan (lavapipe) in CI:
//! `VK_ICD_FILENAMES=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json`.
#![cfg(feature = "wgpu")]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{expected, fixtures, phitune, scratch, stderr, stdout};
use phitune_train::metrics;
use serde_json::Value;

fn tiny() -> String {
    fixtures().join("tiny-phi").display().to_string()
}

fn json(o: &Output) -> Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_str(stdout(o).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

/// Scores `cases` (each with a "text") in one process: one JSON object per case.
fn score(model: &str, cases: &[Value], extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["score", "--device", "wgpu", "--model", model];
    for case in cases {
        args.extend(["--text", case["text"].as_str().unwrap()]);
    }
    args.extend_from_slice(extra);
    let o = phitune(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), cases.len());
    lines
}

fn assert_nll(got: &Value, want: &Value, tol: f64, what: &str) {
    assert_eq!(got["tokens"], want["tokens"], "{what}: tokens");
    let (g, w) = (
        got["nll"].as_array().unwrap(),
        want["nll"].as_array().unwrap(),
    );
    assert_eq!(g.len(), w.len(), "{what}");
    for (i, (g, w)) in g.iter().zip(w).enumerate() {
        let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
        assert!((g - w).abs() < tol, "{what} token {i}: {g} vs {w}");
    }
}

/// `score` on wgpu: HF's tokens and per-token NLLs within 1e-3, for both fixture configs
/// (tiny-phi-alt has grouped-query attention, qk_layernorm and a partial rotary embedding).
#[test]
fn score_matches_hf() {
    let exp = expected();
    for name in ["tiny-phi", "tiny-phi-alt"] {
        let dir = fixtures().join(name).display().to_string();
        let cases = exp[name]["score"].as_array().unwrap();
        for (got, case) in score(&dir, cases, &[]).iter().zip(cases) {
            assert_nll(got, case, 1e-3, name);
        }
    }
}

/// `--quant nf4` on wgpu scores within 5e-3 of HF with bitsandbytes-dequantized weights.
#[test]
fn nf4_score_matches_bitsandbytes() {
    let exp = expected();
    let cases = exp["nf4"]["tiny-phi"]["double_quant"].as_array().unwrap();
    for (got, case) in score(&tiny(), cases, &["--quant", "nf4"]).iter().zip(cases) {
        assert_nll(got, case, 5e-3, "nf4");
    }
}

/// `generate` on wgpu (KV cache on): HF's greedy tokens, with and without the seed recipe's
/// repetition penalty, in f32 and on an NF4 base (the decode GEMV).
#[test]
fn generate_matches_hf_greedy() {
    let exp = expected();
    for i in [0usize, 3] {
        let case = &exp["tiny-phi"]["greedy"][i];
        let max = case["max_new_tokens"].as_u64().unwrap().to_string();
        let penalty = case["repetition_penalty"]
            .as_f64()
            .unwrap_or(1.0)
            .to_string();
        let args = [
            "generate",
            "--device",
            "wgpu",
            "--model",
            &tiny(),
            "--prompt",
            case["prompt"].as_str().unwrap(),
            "--temperature",
            "0",
            "--max-new-tokens",
            &max,
            "--repetition-penalty",
            &penalty,
            "--json",
        ];
        assert_eq!(
            json(&phitune(&args))["tokens"],
            case["new_tokens"],
            "case {i}"
        );
    }
    // An NF4 base decodes through the GEMV: the same tokens as the CPU's NF4 path.
    let nf4 = |device: &str| {
        json(&phitune(&[
            "generate",
            "--device",
            device,
            "--model",
            &tiny(),
            "--quant",
            "nf4",
            "--prompt",
            "i have a dog named",
            "--max-new-tokens",
            "12",
            "--json",
        ]))["tokens"]
            .clone()
    };
    assert_eq!(nf4("wgpu"), nf4("cpu"));
}

fn train(out: &Path, device: &str) {
    let sample =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/samples/persona_chat_sample.jsonl");
    let o = phitune(&[
        "train",
        "--device",
        device,
        "--model",
        &tiny(),
        "--data",
        sample.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        "4",
        "--micro-batch",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "1e-3",
        "--lora-dropout",
        "0.1",
        // Fixed 128-token rows: one shape for every batch, so lavapipe compiles and autotunes
        // the kernels once.
        "--template",
        "seed",
        "--quant",
        "nf4",
        "--valid-fraction",
        "0.1",
        "--eval-rows",
        "4",
        "--eval-every",
        "4",
        "--save-every",
        "4",
    ]);
    assert!(o.status.success(), "{device}: {}", stderr(&o));
}

fn losses(out: &Path, split: &str) -> Vec<f64> {
    metrics::read(&out.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.split == split)
        .map(|r| r.loss)
        .collect()
}

/// A 4-step QLoRA fine-tune (NF4 base, LoRA dropout 0.1) on wgpu gives the CPU run's per-step
/// losses within 2e-3, and the two adapters score the same on the CPU.
#[test]
fn a_qlora_fine_tune_matches_the_cpu_run() {
    let dir = scratch("wgpu-train");
    let (gpu, cpu) = (dir.join("wgpu"), dir.join("cpu"));
    train(&gpu, "wgpu");
    train(&cpu, "cpu");
    let (g, c) = (losses(&gpu, "train"), losses(&cpu, "train"));
    assert_eq!(g.len(), 4);
    for (i, (a, b)) in g.iter().zip(&c).enumerate() {
        assert!((a - b).abs() < 2e-3, "step {}: wgpu {a} vs cpu {b}", i + 1);
    }
    let tiny = tiny();
    let text = "i love walking my dog in the park.";
    let scored = |extra: &[&str]| {
        let mut args = vec!["score", "--device", "cpu", "--model", &tiny, "--text", text];
        args.extend_from_slice(extra);
        json(&phitune(&args))
    };
    let (g, c) = (
        scored(&["--adapter", gpu.to_str().unwrap()]),
        scored(&["--adapter", cpu.to_str().unwrap()]),
    );
    assert_nll(&g, &c, 2e-3, "adapters");
    // ...and they are trained adapters: the base scores differently.
    let base = scored(&[]);
    let moved = base["nll"]
        .as_array()
        .unwrap()
        .iter()
        .zip(g["nll"].as_array().unwrap())
        .map(|(a, b)| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs())
        .fold(0.0, f64::max);
    assert!(moved > 1e-3, "training changed the model");
}

/// `chat` on wgpu: one scripted turn, the same reply as on the CPU.
#[test]
fn chat_answers_one_turn() {
    let turn = |device: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_phitune"))
            .args([
                "chat",
                "--device",
                device,
                "--model",
                &tiny(),
                "--persona",
                "i like cats.",
                "--json",
                "--temperature",
                "0",
                "--max-new-tokens",
                "8",
            ])
            .env("HF_HUB_OFFLINE", "1")
            .env(
                "PHITUNE_CACHE",
                Path::new(env!("CARGO_TARGET_TMPDIR")).join("phitune-cache"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"hello there! do you have pets?\n")
            .unwrap();
        json(&child.wait_with_output().unwrap())
    };
    let (g, c) = (turn("wgpu"), turn("cpu"));
    assert_eq!(g["user"], "hello there! do you have pets?");
    assert_eq!(g["reply"], c["reply"]);
}
