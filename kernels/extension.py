"""The CUDA C++ extension in `csrc/` (shipped as `retentivekv_vllm.csrc`), compiled on first use.

It is built with torch's JIT loader only where a CUDA device and the CUDA toolkit are present;
everywhere else, and if the build fails, the operations fall back to their plain-torch twins,
so the package installs and runs without a compiler.

* `merge_with_state`: the log-space merge of local attention with one (gain-summed) state
  readout; twin `retentivekv_vllm.core.merge.merge_with_states`.
"""

import functools
import logging
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from retentivekv_vllm.core.merge import merge_with_states

logger = logging.getLogger("vllm.retentivekv_vllm")

EXTENSION_NAME = "retentivekv_csrc"


@dataclass(frozen=True)
class Extension:
    """The compiled module, or None with the reason the torch fallback serves instead."""

    module: ModuleType | None
    reason: str


@functools.cache
def cuda_extension() -> Extension:
    if not torch.cuda.is_available():
        return Extension(None, "no CUDA device")
    from torch.utils.cpp_extension import CUDA_HOME, load

    if CUDA_HOME is None:
        return Extension(None, "no CUDA toolkit (set CUDA_HOME or put nvcc on PATH)")
    from retentivekv_vllm.csrc import SOURCES

    try:
        module = load(name=EXTENSION_NAME, sources=list(SOURCES), extra_cuda_cflags=["-O3"])
    except (RuntimeError, OSError, ImportError) as error:
        # A missing ninja or host compiler, or a toolkit that does not match torch's CUDA.
        logger.warning("retentivekv: CUDA extension not built (%s); using the torch fallback", error)
        return Extension(None, f"build failed: {error}")
    return Extension(module, "compiled")


def merge_with_state(out_local: Tensor, lse_local: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """Merge local attention out_local [..., dv] (lse_local [...]) with a state readout
    (numerator [..., dv], denominator [...], gains already applied) -> [..., dv] in
    out_local's dtype; rows with denominator 0 are out_local unchanged."""
    module = cuda_extension().module if out_local.is_cuda else None
    if module is not None:
        return module.merge_with_state(out_local, lse_local.float(), numerator.float(), denominator.float())
    return merge_with_states(out_local, lse_local, [numerator], [denominator]).to(out_local.dtype)
