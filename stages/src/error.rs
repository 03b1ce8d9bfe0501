//! The stages' error type.

use std::path::{Path, PathBuf};

/// What a stage can fail with; every variant names the file (and row) concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    BadFile { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Table { path: PathBuf, message: String },
    #[error("{}", .0)]
    Labels(String),
    #[error("{}", .0)]
    Splits(String),
    #[error("{}", .0)]
    Features(String),
    /// Reading, segmenting or writing a slide (the message names the file).
    #[error(transparent)]
    Slide(#[from] wsi::Error),
    /// A bad argument to `init`.
    #[error("{}", .0)]
    Init(String),
    /// The run was interrupted; says where the stage stopped.
    #[error("stopped {0}")]
    Interrupted(String),
}

impl Error {
    /// An I/O error about `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io { path: path.into(), source }
    }
}

/// Result with the stages' error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
