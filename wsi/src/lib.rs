//! Whole-slide images: reading slides through OpenSlide, segmenting tissue, laying patch grids,
//! drawing QC pictures, and writing pyramidal TIFF slides.

pub mod error;
pub mod grid;
pub mod openslide;
pub mod qc;
pub mod tiff;
pub mod tissue;

pub use error::{Error, Result};
pub use grid::{Grid, GridSpec, Tiling, tile};
pub use openslide::Slide;
pub use tissue::{Threshold, TissueParams};
