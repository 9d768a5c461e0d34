//! `phitune-data`: everything between the Persona-Chat data set and token batches: rows from the
//! hub, parquet or JSONL (`load.rs`, `row.rs`), the stable train/held-out split (`split.rs`), the
//! prompt templates and loss masks (`prompt.rs`), and padded or packed batches (`batch.rs`). It
//! uses only the tokenizer and the hub and file code of `phitune-model`. See ARCHITECTURE.md
//! at the repository's root for the map of the whole workspace.
#![forbid(unsafe_code)]

pub mod batch;
pub mod load;
pub mod prompt;
pub mod row;
pub mod split;

pub use load::{DataError, LoadOptions, Loaded, load_source};
pub use prompt::Template;
pub use row::PersonaRow;
