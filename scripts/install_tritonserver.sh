#!/usr/bin/env bash
# Installs a CPU-capable tritonserver (2.51, python backend) into DEST from the nvidia-pytriton
# wheel on PyPI. Only the server folder and its bundled libraries are unpacked: installing the
# wheel as a package would pin an old numpy into the project's environment.
#   usage: PY=.venv/bin/python scripts/install_tritonserver.sh DEST
set -euo pipefail
DEST=${1:?destination folder}
PY=${PY:-python3}
PYTRITON_VERSION=${PYTRITON_VERSION:-0.7.0}
CACHE=${CACHE:-.cache/wheels}

mkdir -p "$CACHE" "$DEST"
wheel=$(ls "$CACHE"/nvidia_pytriton-"$PYTRITON_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$CACHE" "nvidia-pytriton==$PYTRITON_VERSION"
  wheel=$(ls "$CACHE"/nvidia_pytriton-"$PYTRITON_VERSION"-*.whl | head -n1)
fi
"$PY" - "$wheel" "$DEST" <<'PYEOF'
import sys, zipfile, os, stat
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as zf:
    for info in zf.infolist():
        if info.filename.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")):
            path = zf.extract(info, dest)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(path, mode | stat.S_IRUSR)
PYEOF
pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
server="$DEST/pytriton/tritonserver"
stub="$server/python_backend_stubs/$pyver/triton_python_backend_stub"
[ -f "$stub" ] || { echo "no python backend stub for Python $pyver in nvidia-pytriton $PYTRITON_VERSION" >&2; exit 1; }
cp "$stub" "$server/backends/python/triton_python_backend_stub"
chmod +x "$server/bin/tritonserver" "$server/backends/python/triton_python_backend_stub"
touch "$DEST/.stamp"
echo "tritonserver installed in $server"
