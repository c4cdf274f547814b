#!/usr/bin/env bash
# Install a real Triton Inference Server 2.51.0 (CPU, python backend) into its own venv.
#
#   bash bench/tritonpeer/setup.sh            # venv at $KAPI_TRITON_VENV (default /opt/kapi-triton/venv)
#
# Idempotent: a venv whose marker matches the requirements is left as it is. The tritonserver
# binary comes from the nvidia-pytriton wheel (0.5.13 to 0.7.0 all embed Triton 2.51.0); it needs
# numpy<2, hence the separate venv. Prints the tritonserver path on the last line.
set -euo pipefail

VENV="${KAPI_TRITON_VENV:-/opt/kapi-triton/venv}"
PYTHON="${KAPI_TRITON_PYTHON:-python3.11}"
REQUIREMENTS=(
    "nvidia-pytriton==0.7.0"
    "onnxruntime==${KAPI_TRITON_ONNXRUNTIME:-1.32.0}"
    "numpy<2"
)
MARKER="$VENV/.kapi-triton-requirements"

if [[ ! -f "$MARKER" || "$(cat "$MARKER")" != "${REQUIREMENTS[*]}" ]]; then
    echo "installing ${REQUIREMENTS[*]} into $VENV ..." >&2
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}"
    echo "${REQUIREMENTS[*]}" > "$MARKER"
fi

# The wheel keeps one python backend stub per Python version; the backend looks for it next to
# libtriton_python.so, so put the venv's own there (pytriton does the same in its workspace).
DIST="$("$VENV/bin/python" -c 'import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent / "tritonserver")')"
PY_VERSION="$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
STUB="$DIST/python_backend_stubs/$PY_VERSION/triton_python_backend_stub"
if ! cmp -s "$STUB" "$DIST/backends/python/triton_python_backend_stub"; then
    cp "$STUB" "$DIST/backends/python/triton_python_backend_stub"
fi

echo "$DIST/bin/tritonserver"
