//! Adversarial files that the other suites do not cover: oversized and deeply nested JSON,
//! a pickle-only adapter, a weights header declaring a 10^12-element tensor.

mod common;

use common::{assert_one_line_error, copy_fixture, fixtures, phitune, scratch};

fn score(dir: &std::path::Path) -> std::process::Output {
    phitune(&["score", "--model", dir.to_str().unwrap(), "--text", "a b"])
}

#[test]
fn oversized_and_deeply_nested_config_json() {
    let dir = copy_fixture("tiny-phi", "untrusted-big-config");
    let cfg = dir.join("config.json");
    let orig = std::fs::read_to_string(&cfg).unwrap();
    // 2 MiB of padding inside an otherwise valid config: refused by size, before parsing.
    let padded = orig.replacen('{', &format!("{{\"pad\": \"{}\",", "x".repeat(2 << 20)), 1);
    std::fs::write(&cfg, padded).unwrap();
    assert_one_line_error(&score(&dir), "larger than the 1048576-byte limit");
    // 100k nested arrays: an error, not a stack overflow.
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    std::fs::write(&cfg, nested).unwrap();
    assert_one_line_error(&score(&dir), "config.json");
    // Unknown keys are tolerated (configs from newer transformers versions carry more).
    let extra = orig.replacen('{', "{\"some_future_key\": {\"a\": [1, 2]},", 1);
    std::fs::write(&cfg, extra).unwrap();
    let o = score(&dir);
    assert!(o.status.success(), "{}", common::stderr(&o));
}

#[test]
fn a_pickle_only_adapter_is_refused_with_the_reason() {
    let dir = scratch("untrusted-pickle-adapter");
    std::fs::copy(
        fixtures().join("adapters/peft-qkvd-r4/adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(dir.join("adapter_model.bin"), b"PK\x03\x04 pickle").unwrap();
    let tiny = fixtures().join("tiny-phi");
    let o = phitune(&[
        "score",
        "--model",
        tiny.to_str().unwrap(),
        "--adapter",
        dir.to_str().unwrap(),
        "--text",
        "a b",
    ]);
    assert_one_line_error(&o, "phitune reads safetensors only");
}

#[test]
fn a_header_declaring_a_huge_tensor_fails_fast() {
    let dir = copy_fixture("tiny-phi", "untrusted-huge-tensor");
    let shard = dir.join("model-00001-of-00002.safetensors");
    let header = br#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,16]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 16]);
    std::fs::write(&shard, bytes).unwrap();
    // A 4 TB allocation would abort the process; instead the header is refused with one line.
    assert_one_line_error(&score(&dir), "model-00001-of-00002.safetensors");
}
