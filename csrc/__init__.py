"""The CUDA C++ sources of the torch extension that `retentivekv_vllm.kernels.extension` builds
on first use where CUDA is present (shipped with the package, compiled on the user's machine)."""

from pathlib import Path

SOURCES = tuple(sorted(str(path) for path in Path(__file__).parent.glob("*.cu")))
