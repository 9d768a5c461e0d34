//! Everything between the Persona-Chat data set and token batches.
#![forbid(unsafe_code)]

pub mod batch;
pub mod load;
pub mod prompt;
pub mod row;
pub mod split;

pub use load::{DataError, LoadOptions, Loaded, load_source};
pub use prompt::Template;
pub use row::PersonaRow;
