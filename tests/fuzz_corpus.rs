//! Replays the fuzzers' committed inputs (`fuzz/seeds/TARGET` and `fuzz/corpus/TARGET`, the
//! latter minimised with `cargo fuzz cmin`) through the same parsers and checks as the fuzz
//! targets, on stable Rust, so every input a fuzzer found interesting stays a regression test.

use std::path::{Path, PathBuf};

use phitune_data::load::{LoadOptions, load_file};
use phitune_model::PhiConfig;
use phitune_model::io::adapter::Adapter;
use phitune_model::io::safetensors::SafetensorsFile;

/// The hand-written seeds and the minimised corpus of `target`.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for dir in [
        fuzz.join("seeds").join(target),
        fuzz.join("corpus").join(target),
    ] {
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            out.push((p, bytes));
        }
    }
    out.sort();
    assert!(out.len() > 20, "{target}: only {} inputs", out.len());
    out
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn safetensors_header_corpus() {
    let path = scratch("fuzz-safetensors").join("model.safetensors");
    let mut opened = 0;
    for (input, data) in corpus("safetensors_header") {
        std::fs::write(&path, &data).unwrap();
        if let Ok(file) = SafetensorsFile::open(&path) {
            opened += 1;
            for name in file.tensors().keys() {
                let bytes = file
                    .read_bytes(name)
                    .unwrap_or_else(|e| panic!("{}: {name}: {e}", input.display()));
                assert!(bytes.len() <= data.len());
            }
        }
    }
    assert!(opened > 0, "no valid file in the corpus");
}

#[test]
fn model_config_corpus() {
    for (_, data) in corpus("model_config") {
        if let Ok(text) = std::str::from_utf8(&data)
            && let Ok(config) = PhiConfig::from_json(text)
        {
            let _ = config.expected_tensors();
            let _ = config.num_parameters();
        }
    }
}

#[test]
fn adapter_corpus() {
    let dir = scratch("fuzz-adapter");
    for (_, data) in corpus("adapter") {
        let (config, weights) = match data.iter().position(|&b| b == 0xFF) {
            Some(i) => (&data[..i], &data[i + 1..]),
            None => (&data[..], &[][..]),
        };
        std::fs::write(dir.join("adapter_config.json"), config).unwrap();
        std::fs::write(dir.join("adapter_model.safetensors"), weights).unwrap();
        let _ = Adapter::read(&dir);
    }
}

#[test]
fn data_rows_corpus() {
    let dir = scratch("fuzz-data-rows");
    for (_, data) in corpus("data_rows") {
        for ext in ["jsonl", "json", "parquet"] {
            let path = dir.join(format!("rows.{ext}"));
            std::fs::write(&path, &data).unwrap();
            for skip_invalid in [false, true] {
                if let Ok(loaded) = load_file(&path, LoadOptions { skip_invalid }) {
                    for row in &loaded.rows {
                        assert!(row.validate().is_ok());
                    }
                }
            }
        }
    }
}
