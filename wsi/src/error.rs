//! The slide crate's error type.

use std::path::PathBuf;

/// What reading, segmenting or writing a slide can fail with; each names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libopenslide could not be loaded.
    #[error(
        "OpenSlide is not available ({tried}). Run `. scripts/env.sh` (it installs the openslide-bin wheel \
         into the project venv), or install Debian's libopenslide0, or set HMIL_FLOW_OPENSLIDE to a libopenslide.so"
    )]
    NoOpenSlide { tried: String },
    /// OpenSlide could not open or read the file.
    #[error("{}: {message}", path.display())]
    Slide { path: PathBuf, message: String },
    /// The slide has no microns-per-pixel metadata and no fallback was given.
    #[error(
        "{}: the slide says nothing of its microns per pixel (no openslide.mpp-x); set `mpp_fallback` \
         under [slides] to the scanner's resolution (0.25 at 40x, 0.5 at 20x)",
        path.display()
    )]
    NoMpp { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    Image { path: PathBuf, source: image::ImageError },
}

/// Result with the slide crate's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
