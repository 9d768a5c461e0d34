//! The model crate's error type. Every variant names the file (and tensor or key) it is about,
//! so the CLI can print it as one line.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{0}")]
    Hub(String),
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub(crate) fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// Prints `error: {line}` and a newline on stderr in one write. `eprintln!` writes each piece of
/// its format separately (stderr is unbuffered), and a launcher that forwards several
/// processes' stderr (`mpirun`) can then put its own lines between `error: ` and the message.
/// One write of a line under the pipe's atomic size (4 KiB) arrives whole.
pub fn print_error_line(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("error: {line}\n").as_bytes());
}
