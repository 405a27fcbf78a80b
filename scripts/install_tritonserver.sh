#!/usr/bin/env bash
# Installs a CPU-capable tritonserver (2.51, python backend) into DEST from the nvidia-pytriton
# wheel on PyPI. Only the server folder and its bundled libraries are unpacked: installing the
# wheel as a package would pin an old numpy into the project's environment.
#
# The python backend stub of 2.51 exchanges tensors with numpy through a pybind11 build that
# predates numpy 2: with numpy 2 in the stub's interpreter, tensor data is silently corrupted
# (INT32 [1,2,3] arrives as [1,1,1]) and BYTES tensors crash the stub. So the stub gets its own
# small environment, DEST/stubenv: numpy 1.x there, and every package of the project's
# environment (torch, the project itself, ...) visible after it through a site directory.
# backends/launcher.py puts DEST/stubenv/bin first on PATH, which is how the stub picks it.
#   usage: PY=.venv/bin/python scripts/install_tritonserver.sh DEST
set -euo pipefail
DEST=${1:?destination folder}
PY=${PY:-python3}
PYTRITON_VERSION=${PYTRITON_VERSION:-0.7.0}
STUB_NUMPY=${STUB_NUMPY:-numpy>=1.26,<2}
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

# The stub links libpython3.X.so dynamically; the launcher puts the interpreter's LIBDIR on
# LD_LIBRARY_PATH so the stub runs the same Python build as the environment it imports from.
libdir=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')
missing=$(LD_LIBRARY_PATH="$DEST/nvidia_pytriton.libs:$libdir" ldd "$server/backends/python/triton_python_backend_stub" | grep "not found" || true)
if [ -n "$missing" ]; then
  echo "the python backend stub cannot load its libraries (a Python built with --enable-shared is needed):" >&2
  echo "$missing" >&2
  exit 1
fi

stubenv="$DEST/stubenv"
rm -rf "$stubenv"
"$PY" -m venv --without-pip "$stubenv"
"$PY" -m pip --python "$stubenv/bin/python" install -q "$STUB_NUMPY"
# A .pth line that starts with "import" is executed: addsitedir also runs the project
# environment's own .pth files (the editable install of this project among them).
sitedirs=$("$PY" -c 'import sysconfig; p = sysconfig.get_paths(); print(*dict.fromkeys([p["purelib"], p["platlib"]]))')
stubsite=$("$stubenv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
: > "$stubsite/zz_project_env.pth"
for d in $sitedirs; do
  echo "import site; site.addsitedir('$(cd "$d" && pwd)')" >> "$stubsite/zz_project_env.pth"
done
"$stubenv/bin/python" -c 'import numpy, sys; assert numpy.__version__ < "2", numpy.__version__' \
  || { echo "the stub environment $stubenv does not have numpy 1.x" >&2; exit 1; }
touch "$DEST/.stamp"
echo "tritonserver installed in $server (python stub environment: $stubenv)"
