//! Slides read through libopenslide, loaded when the first slide is opened: from
//! `HMIL_FLOW_OPENSLIDE`, the project venv's `openslide-bin` wheel (found at build time), or the
//! system's libopenslide. Nothing links against it, so a build never needs it.

use std::ffi::{CStr, CString, c_char, c_void};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::OnceLock;

use image::RgbImage;

use crate::error::{Error, Result};

type Osr = *mut c_void;

/// The few libopenslide functions the crate calls.
struct Api {
    detect_vendor: unsafe extern "C" fn(*const c_char) -> *const c_char,
    open: unsafe extern "C" fn(*const c_char) -> Osr,
    close: unsafe extern "C" fn(Osr),
    get_error: unsafe extern "C" fn(Osr) -> *const c_char,
    get_level_count: unsafe extern "C" fn(Osr) -> i32,
    get_level_dimensions: unsafe extern "C" fn(Osr, i32, *mut i64, *mut i64),
    get_level_downsample: unsafe extern "C" fn(Osr, i32) -> f64,
    get_property_value: unsafe extern "C" fn(Osr, *const c_char) -> *const c_char,
    read_region: unsafe extern "C" fn(Osr, *mut u32, i64, i64, i32, i64, i64),
    /// Keeps the symbols above valid.
    _lib: libloading::Library,
}

/// Where libopenslide is looked for, in order.
fn candidates() -> Vec<String> {
    let mut out: Vec<String> = std::env::var("HMIL_FLOW_OPENSLIDE").into_iter().collect();
    out.extend(option_env!("WSI_VENV_OPENSLIDE").map(String::from));
    out.extend(["libopenslide.so.1".into(), "libopenslide.so.0".into()]);
    out
}

fn load(path: &str) -> std::result::Result<Api, libloading::Error> {
    // SAFETY: libopenslide's initialisers have no preconditions, and each symbol is given the
    // signature of OpenSlide's C API (openslide.h, stable since 3.4).
    unsafe {
        let lib = libloading::Library::new(path)?;
        Ok(Api {
            detect_vendor: *lib.get(b"openslide_detect_vendor\0")?,
            open: *lib.get(b"openslide_open\0")?,
            close: *lib.get(b"openslide_close\0")?,
            get_error: *lib.get(b"openslide_get_error\0")?,
            get_level_count: *lib.get(b"openslide_get_level_count\0")?,
            get_level_dimensions: *lib.get(b"openslide_get_level_dimensions\0")?,
            get_level_downsample: *lib.get(b"openslide_get_level_downsample\0")?,
            get_property_value: *lib.get(b"openslide_get_property_value\0")?,
            read_region: *lib.get(b"openslide_read_region\0")?,
            _lib: lib,
        })
    }
}

fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let mut tried = Vec::new();
        for candidate in candidates() {
            match load(&candidate) {
                Ok(api) => return Ok(api),
                Err(e) => tried.push(format!("{candidate}: {e}")),
            }
        }
        Err(tried.join("; "))
    })
    .as_ref()
    .map_err(|tried| Error::NoOpenSlide { tried: tried.clone() })
}

/// Whether libopenslide can be loaded here.
pub fn available() -> bool {
    api().is_ok()
}

/// One level of a slide's pyramid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Level {
    pub width: u64,
    pub height: u64,
    /// Level-0 pixels per pixel of this level.
    pub downsample: f64,
}

/// The level of `levels` whose downsample is the largest not above `downsample` (level 0 if
/// none is).
pub fn level_for(levels: &[Level], downsample: f64) -> usize {
    levels.iter().rposition(|l| l.downsample <= downsample * (1.0 + 1e-6)).unwrap_or(0)
}

/// An open slide. OpenSlide handles may be read from several threads at once.
pub struct Slide {
    osr: NonNull<c_void>,
    api: &'static Api,
    path: PathBuf,
    levels: Vec<Level>,
}

// SAFETY: OpenSlide documents its handles as safe to use from several threads at once.
unsafe impl Send for Slide {}
// SAFETY: as above.
unsafe impl Sync for Slide {}

fn text(ptr: *const c_char) -> Option<String> {
    // SAFETY: OpenSlide returns NUL-terminated strings that live as long as the handle.
    (!ptr.is_null()).then(|| unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned())
}

impl Slide {
    /// Opens `path`; a file that no OpenSlide format recognises, or that it cannot read, is an
    /// error naming it.
    pub fn open(path: &Path) -> Result<Slide> {
        let api = api()?;
        let bad = |message: String| Error::Slide { path: path.to_path_buf(), message };
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| bad("the path contains a NUL byte".into()))?;
        // SAFETY: a valid C string; OpenSlide returns null or a static string.
        if unsafe { (api.detect_vendor)(c_path.as_ptr()) }.is_null() && !path.is_file() {
            return Err(bad("no such file".into()));
        }
        // SAFETY: as above; the handle is closed in Drop.
        let Some(osr) = NonNull::new(unsafe { (api.open)(c_path.as_ptr()) }) else {
            return Err(bad("not a slide in any format OpenSlide reads".into()));
        };
        let mut slide = Slide { osr, api, path: path.to_path_buf(), levels: Vec::new() };
        slide.check()?;
        // SAFETY: a live handle.
        let count = unsafe { (api.get_level_count)(osr.as_ptr()) };
        for level in 0..count.max(0) {
            let (mut w, mut h) = (0i64, 0i64);
            // SAFETY: a live handle and a level below the count.
            let downsample = unsafe {
                (api.get_level_dimensions)(osr.as_ptr(), level, &mut w, &mut h);
                (api.get_level_downsample)(osr.as_ptr(), level)
            };
            slide.levels.push(Level { width: w.max(0) as u64, height: h.max(0) as u64, downsample });
        }
        slide.check()?;
        if slide.levels.is_empty() || slide.levels[0].width == 0 {
            return Err(bad("the slide has no readable levels".into()));
        }
        Ok(slide)
    }

    /// OpenSlide's error for this handle, if one happened (it then fails every later call).
    fn check(&self) -> Result<()> {
        // SAFETY: a live handle.
        match text(unsafe { (self.api.get_error)(self.osr.as_ptr()) }) {
            Some(message) => Err(Error::Slide { path: self.path.clone(), message }),
            None => Ok(()),
        }
    }

    /// The file it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pyramid, level 0 (full resolution) first.
    pub fn levels(&self) -> &[Level] {
        &self.levels
    }

    /// A property such as `openslide.mpp-x` or `openslide.quickhash-1`.
    pub fn property(&self, name: &str) -> Option<String> {
        let name = CString::new(name).ok()?;
        // SAFETY: a live handle and a valid C string.
        text(unsafe { (self.api.get_property_value)(self.osr.as_ptr(), name.as_ptr()) })
    }

    /// Microns per level-0 pixel (the mean of x and y), when the slide says.
    pub fn mpp(&self) -> Option<f64> {
        let read = |axis: &str| self.property(&format!("openslide.mpp-{axis}"))?.trim().parse::<f64>().ok();
        match (read("x"), read("y")) {
            (Some(x), Some(y)) if x > 0.0 && y > 0.0 => Some((x + y) / 2.0),
            (Some(x), None) if x > 0.0 => Some(x),
            _ => None,
        }
    }

    /// See [`level_for`].
    pub fn level_for_downsample(&self, downsample: f64) -> usize {
        level_for(&self.levels, downsample)
    }

    /// The `width` × `height` pixels of `level` whose top-left corner is at (`x`, `y`) in level-0
    /// coordinates, as RGB over white (transparent pixels, outside the scanned area, are white).
    pub fn read_rgb(&self, x: i64, y: i64, level: usize, width: u32, height: u32) -> Result<RgbImage> {
        let mut argb = vec![0u32; width as usize * height as usize];
        // SAFETY: a live handle; the buffer holds width × height pixels.
        unsafe {
            (self.api.read_region)(
                self.osr.as_ptr(),
                argb.as_mut_ptr(),
                x,
                y,
                level as i32,
                i64::from(width),
                i64::from(height),
            );
        }
        self.check()?;
        let mut rgb = vec![0u8; argb.len() * 3];
        for (out, &p) in rgb.chunks_exact_mut(3).zip(&argb) {
            // Premultiplied ARGB: over white, each channel is c + (255 - alpha).
            let white = 255 - (p >> 24);
            out[0] = (((p >> 16) & 0xff) + white).min(255) as u8;
            out[1] = (((p >> 8) & 0xff) + white).min(255) as u8;
            out[2] = ((p & 0xff) + white).min(255) as u8;
        }
        Ok(RgbImage::from_raw(width, height, rgb).expect("width × height × 3 bytes"))
    }
}

impl Drop for Slide {
    fn drop(&mut self) {
        // SAFETY: the handle is live and closed once.
        unsafe { (self.api.close)(self.osr.as_ptr()) }
    }
}
