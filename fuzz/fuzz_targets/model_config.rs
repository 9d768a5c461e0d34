//! Arbitrary bytes as a model `config.json`: parsing and validation return a value or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phitune_model::PhiConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(config) = PhiConfig::from_json(text)
    {
        // A config that parses and validates has a consistent geometry.
        let _ = config.expected_tensors();
        let _ = config.num_parameters();
    }
});
