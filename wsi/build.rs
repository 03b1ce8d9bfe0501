//! Records where the project venv's `openslide-bin` wheel keeps libopenslide, so the binary finds
//! it without `LD_LIBRARY_PATH` (it is loaded when a workflow first opens a slide).
fn main() {
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    let Some(venv) = std::env::var_os("VIRTUAL_ENV") else { return };
    let lib = std::path::Path::new(&venv).join("lib");
    for entry in std::fs::read_dir(&lib).into_iter().flatten().flatten() {
        let candidate = entry.path().join("site-packages/openslide_bin/libopenslide.so.1");
        if candidate.is_file() {
            println!("cargo:rustc-env=WSI_VENV_OPENSLIDE={}", candidate.display());
            println!("cargo:rerun-if-changed={}", candidate.display());
            return;
        }
    }
}
