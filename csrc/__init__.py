"""The C++ sources of the package's torch extensions, shipped with it and compiled on the user's
machine on first use by torch's JIT loader (`build`):

* `merge_with_state.cu` (CUDA), loaded by `retentivekv_vllm.kernels.extension` where CUDA is
present;
* `cpu_decode.cpp` (CPU), loaded by `retentivekv_vllm.engine.cpu_kernel` for the CPU backend.

A missing compiler or a failed build is not an error: each caller falls back to its torch twin.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

logger = logging.getLogger("vllm.retentivekv_vllm")

SOURCE_DIR = Path(__file__).parent
CUDA_SOURCES = tuple(sorted(str(path) for path in SOURCE_DIR.glob("*.cu")))
CPU_DECODE_SOURCE = str(SOURCE_DIR / "cpu_decode.cpp")


@dataclass(frozen=True)
class Extension:
    """The compiled module, or None with the reason the torch fallback serves instead."""

    module: ModuleType | None
    reason: str


def build(name: str, sources: list[str], **flags) -> Extension:
    """Compile (or load the cached build of) the extension `name` from `sources`."""
    from torch.utils.cpp_extension import load

    try:
        module = load(name=name, sources=sources, **flags)
    except (RuntimeError, OSError, ImportError) as error:
        # A missing ninja or compiler, or a toolchain that does not match torch's build.
        logger.warning(
            "retentivekv: extension %s not built (%s); using the torch fallback", name, error
        )
        return Extension(None, f"build failed: {error}")
    return Extension(module, "compiled")
