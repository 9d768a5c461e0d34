//! Arbitrary bytes as a `.safetensors` file: opening it either fails with an error or yields
//! tensors whose every byte range lies inside the file, and reading each one succeeds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phitune_model::io::safetensors::SafetensorsFile;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let path = common::scratch().join("model.safetensors");
    std::fs::write(&path, data).unwrap();
    if let Ok(file) = SafetensorsFile::open(&path) {
        let names: Vec<String> = file.tensors().keys().cloned().collect();
        for name in names {
            let bytes = file.read_bytes(&name).expect("a validated tensor is readable");
            assert!(bytes.len() <= data.len());
        }
    }
});
