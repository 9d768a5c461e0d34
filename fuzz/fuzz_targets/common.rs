//! A per-process scratch directory: the parsers under test read files, as they do for users.

use std::path::PathBuf;

pub fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("phitune-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
