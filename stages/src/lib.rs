//! The stages of an HMIL workflow and how a workflow file becomes their DAG ([`plan`]).

pub mod bench;
pub mod error;
pub mod extract;
pub mod features;
pub mod hmil;
pub mod index;
pub mod init;
pub mod labels;
pub mod pack;
mod par;
pub mod pixels;
pub mod plan;
pub mod report;
pub mod rng;
pub mod splits;
pub mod stats;
pub mod synth;
pub mod synth_slides;
mod table;
pub mod thumbnails;
pub mod tile;

pub use error::{Error, Result};
pub use plan::{REPORT, classes, feature_nodes, nodes};
