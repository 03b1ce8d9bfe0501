# Sourced by the scripts. On first use it sets up what the build needs, saying what each step is
# and how long it usually takes: the project venv with torch==2.11.0 (which provides libtorch
# for tch; HMIL_FLOW_VENV moves it) and openslide-bin (libopenslide, which the binary loads when
# it reads slides), and, where Debian's apt can install it, the mold linker.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
setup() { echo "hmil-flow setup: $*" >&2; }
export VIRTUAL_ENV="${HMIL_FLOW_VENV:-$root/.venv}"
if ! "$VIRTUAL_ENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
    setup "creating $VIRTUAL_ENV with torch==2.11.0 (first use only: about 4.6 GB, usually 2-5 min)"
    python3 -m venv "$VIRTUAL_ENV"
    # pip's progress bars on a terminal; its summary only in a log.
    "$VIRTUAL_ENV/bin/pip" install $([ -t 2 ] || echo --quiet) --disable-pip-version-check torch==2.11.0
    setup "torch installed"
fi
if ! "$VIRTUAL_ENV/bin/python" -c 'import openslide_bin' >/dev/null 2>&1; then
    setup "installing OpenSlide (the openslide-bin wheel, which reads slides; first use only, seconds)"
    "$VIRTUAL_ENV/bin/pip" install $([ -t 2 ] || echo --quiet) --disable-pip-version-check openslide-bin==4.0.1.2
fi
if ! command -v ld.mold >/dev/null 2>&1 && ! command -v ld.lld >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ -z "${HMIL_FLOW_NO_APT:-}" ]; then
    setup "installing Debian's mold linker, which links the binaries several times faster (first use only, seconds)"
    apt-get install -y -qq mold >/dev/null 2>&1 || setup "mold is not available; linking with the default linker"
fi
export PATH="$VIRTUAL_ENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
cd "$root"

# Says, before a build with no earlier build to reuse, how long it usually takes.
first_build_note() {
    if [ ! -e "${CARGO_TARGET_DIR:-target}/debug/hmil-flow" ]; then
        setup "first build of hmil-flow and its dependencies: usually about 11 min on 2 cores; later builds take seconds"
    fi
}
