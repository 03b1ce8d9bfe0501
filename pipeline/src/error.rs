//! The engine's error type.

use std::path::PathBuf;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("two nodes share the id `{0}`")]
    DuplicateNode(String),
    #[error("node `{node}` reads input `{input}` from `{from}`, which is not a node of this workflow")]
    DanglingInput { node: String, input: String, from: String },
    #[error("node `{node}` reads `{artifact}` from `{from}`, which declares no such output (it writes: {available})")]
    UnknownArtifact { node: String, artifact: String, from: String, available: String },
    #[error("the workflow has a cycle through: {0}")]
    Cycle(String),
    #[error("the workspace {} is in use by another run ({holder}); wait for it, or pass --wait", path.display())]
    Locked { path: PathBuf, holder: String },
    #[error("{}: unreadable record: {source}", path.display())]
    Record { path: PathBuf, source: serde_json::Error },
    #[error("{}: cannot write table: {message}", path.display())]
    Table { path: PathBuf, message: String },
    #[error("{flag} `{name}` matches no stage or node of this workflow; {known}")]
    UnknownNode { flag: &'static str, name: String, known: String },
    #[error("{0}")]
    Attempt(String),
    #[error("{0}")]
    Executor(String),
    #[error("{} {message}; move it away, or set workflow.results to another folder", path.display())]
    ResultsFolder { path: PathBuf, message: String },
}

/// Result with the engine's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps an `io::Error` with the path it concerns.
pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
