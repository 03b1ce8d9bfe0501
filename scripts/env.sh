# Sourced by the scripts. Makes sure the project venv with torch==2.11.0 (which provides
# libtorch for tch) exists, then exports what the build needs. HMIL_FLOW_VENV moves the venv.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VIRTUAL_ENV="${HMIL_FLOW_VENV:-$root/.venv}"
if ! "$VIRTUAL_ENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
    echo "setting up $VIRTUAL_ENV with torch==2.11.0 (first use only; a few GB)" >&2
    python3 -m venv "$VIRTUAL_ENV"
    "$VIRTUAL_ENV/bin/pip" install --quiet --disable-pip-version-check torch==2.11.0
fi
export PATH="$VIRTUAL_ENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
cd "$root"
