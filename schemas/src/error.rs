//! Errors of loading a workflow file.

use std::path::PathBuf;

/// What can be wrong with a workflow file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// `from` is `--set` or `HMIL_FLOW_SET`.
    #[error("{from} {setting}: {message}")]
    Override { from: &'static str, setting: String, message: String },
    #[error("{key} = {}: no such file or directory; set it in the workflow, with --set {key}=PATH, or in HMIL_FLOW_SET", path.display())]
    MissingPath { key: String, path: PathBuf },
    #[error("{key} = {}: it is inside {source_key} = {}, which would then read its files as input; move one of them", path.display(), features.display())]
    InsideFeatures { key: String, path: PathBuf, source_key: String, features: PathBuf },
    /// `origin` says which setting gave the value, when one did (` (from --set k=v)`).
    #[error("{}: `{key}`: {message}{origin}", path.display())]
    Invalid { path: PathBuf, key: String, message: String, origin: String },
}

/// Result with this crate's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
