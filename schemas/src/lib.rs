//! Every Arrow schema of hmil-flow's artifacts, and the types of the workflow file.

pub mod artifacts;
mod error;
pub mod runs;
pub mod tables;
pub mod workflow;

pub use error::{Error, Result};
