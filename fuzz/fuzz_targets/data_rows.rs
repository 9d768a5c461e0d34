//! Arbitrary bytes as a Persona-Chat data file, as JSONL, JSON and parquet: loading returns rows
//! that pass validation, or an error naming the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phitune_data::load::{LoadOptions, load_file};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch();
    for ext in ["jsonl", "json", "parquet"] {
        let path = dir.join(format!("rows.{ext}"));
        std::fs::write(&path, data).unwrap();
        for skip_invalid in [false, true] {
            if let Ok(loaded) = load_file(&path, LoadOptions { skip_invalid }) {
                for row in &loaded.rows {
                    assert!(row.validate().is_ok());
                }
            }
        }
    }
});
