//! Arbitrary bytes as a PEFT adapter directory: the input is split into `adapter_config.json`
//! and `adapter_model.safetensors` at the first 0xFF byte. Reading returns an adapter or an
//! error, never a panic or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phitune_model::io::adapter::Adapter;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (config, weights) = match data.iter().position(|&b| b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let dir = common::scratch().join("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), weights).unwrap();
    let _ = Adapter::read(&dir);
});
