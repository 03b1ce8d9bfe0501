//! Errors of loading a workflow file.

use std::path::PathBuf;

/// What can be wrong with a workflow file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("--set {setting}: {message}")]
    Override { setting: String, message: String },
    #[error("{key} = {}: no such file or directory; set it in the workflow, with --set {key}=PATH, or in HMIL_FLOW_SET", path.display())]
    MissingPath { key: String, path: PathBuf },
    #[error("{}: `{key}`: {message}", path.display())]
    Invalid { path: PathBuf, key: String, message: String },
}

/// Result with this crate's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
