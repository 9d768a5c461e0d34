//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository's root: where the tests were built, or the working directory when that is
/// gone (a test binary carried to another machine and run from a checkout's root).
pub fn root() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"));
    if built.join("tests/fixtures").is_dir() {
        built.to_path_buf()
    } else {
        std::env::current_dir().expect("a working directory")
    }
}

pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

pub fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
        .unwrap()
}

/// A fresh empty directory under the target dir, unique per test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies a fixture checkpoint into a scratch directory so a test can damage it.
pub fn copy_fixture(name: &str, to: &str) -> PathBuf {
    let dst = scratch(to);
    for e in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

/// Runs the binary offline with an empty HF cache.
pub fn phitune(args: &[&str]) -> Output {
    phitune_with_hf_home(
        args,
        &Path::new(env!("CARGO_TARGET_TMPDIR")).join("hf-home-empty"),
    )
}

/// Runs the binary offline against the HF cache under `hf_home`.
pub fn phitune_with_hf_home(args: &[&str], hf_home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phitune"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", hf_home)
        // GPU kernel caches under the target dir, not the user's ~/.cache.
        .env(
            "PHITUNE_CACHE",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("phitune-cache"),
        )
        .output()
        .expect("run phitune")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the command failed with exactly one line on stderr that contains `want`.
pub fn assert_one_line_error(o: &Output, want: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert_ne!(o.status.code(), Some(101), "exited like a panic: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "panic: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {err}");
    assert!(lines[0].starts_with("error"), "{err}");
    assert!(lines[0].contains(want), "expected {want:?} in: {err}");
}

pub mod nf4;
pub mod ranks;

/// tiny-phi with the PEFT adapter whose A and B are both non-zero (so every LoRA gradient is),
/// and its tokenizer.
pub fn tiny_with_adapter<B: phitune_model::Nf4Backend>()
-> (phitune_model::Phi<B>, phitune_model::PhiTokenizer) {
    let device = Default::default();
    let dir = fixtures().join("tiny-phi");
    let ckpt = phitune_model::Checkpoint::open(&dir).unwrap();
    let tok = phitune_model::PhiTokenizer::from_dir(&dir, ckpt.config()).unwrap();
    let adapter =
        phitune_model::io::adapter::Adapter::read(&fixtures().join("adapters/peft-all-r8"))
            .unwrap();
    let phi = phitune_model::Phi::<B>::load(&ckpt, &device)
        .unwrap()
        .with_adapter(&adapter, &device)
        .unwrap();
    (phi, tok)
}

/// The first `rows` rows of the bundled sample, built with `template` and cut at `max_len`, as
/// one padded micro-batch on `device`.
pub fn sample_batch<B: burn::tensor::backend::Backend>(
    tok: &phitune_model::PhiTokenizer,
    template: phitune_data::Template,
    rows: usize,
    max_len: usize,
    device: &B::Device,
) -> phitune_train::lm::LmBatch<B> {
    use burn::data::dataloader::batcher::Batcher;
    let sample = root().join("data/samples/persona_chat_sample.jsonl");
    let loaded = phitune_data::load::load_path(&sample, Default::default()).unwrap();
    let ds =
        phitune_data::batch::ExampleDataset::build(&loaded.rows[..rows], tok, template, max_len)
            .unwrap();
    let items = ds
        .examples
        .into_iter()
        .enumerate()
        .map(|(i, example)| phitune_train::lm::Item {
            position: i as u64,
            example,
        })
        .collect();
    phitune_train::lm::LmBatcher {
        pad_id: tok.eos_token_ids[0],
        pack: None,
        pad_multiple: 1,
    }
    .batch(items, device)
}

/// Every LoRA factor's gradient (A then B, layer by layer), flattened.
pub fn lora_grads<B: burn::tensor::backend::AutodiffBackend>(
    phi: &phitune_model::Phi<B>,
    grads: &B::Gradients,
) -> Vec<Vec<f32>> {
    phi.projections()
        .into_iter()
        .filter_map(|(_, _, p)| p.lora.as_ref().map(|l| (l.a.val(), l.b.val())))
        .flat_map(|(a, b)| [a, b])
        .map(|t| {
            t.grad(grads)
                .expect("every LoRA weight has a gradient")
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .unwrap()
        })
        .collect()
}
