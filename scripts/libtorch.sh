#!/usr/bin/env bash
# libtorch for the `tch` backend, from PyPI alone.
#
# burn-tch 0.22 builds against tch 0.22, which expects libtorch 2.9.0. PyPI's torch==2.9.0 wheel
# carries that libtorch (with its CUDA libraries, about 3 GB): this script installs it into
# `.venv-libtorch` (or $LIBTORCH_VENV) and prints the environment the build and the binaries need.
#
#   scripts/libtorch.sh            # install (once), then print the exports
#   eval "$(scripts/libtorch.sh)"  # install and export into this shell
#   cargo run --release -p resnet-cli --features tch -- --backend tch bench --arch resnet50
#
# Without torch's nvidia-* dependencies `import torch` fails, and torch-sys's build script
# needs that import, so they are installed too, even for CPU use.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${LIBTORCH_VENV:-$PWD/.venv-libtorch}"
python="${PYTHON:-python3}"
if ! "$venv/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.9.0")' 2>/dev/null; then
  echo "installing torch==2.9.0 into $venv (about 3 GB)" >&2
  "$python" -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q "torch==2.9.0" numpy >&2
fi
lib="$("$venv/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
echo "export LIBTORCH_USE_PYTORCH=1"
echo "export PATH=\"$venv/bin:\$PATH\""
echo "export LD_LIBRARY_PATH=\"$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
