"""The CUDA C++ extension in `csrc/` (shipped as `retentivekv_vllm.csrc`), compiled on first use.

It is built with torch's JIT loader only where a CUDA device and the CUDA toolkit are present;
everywhere else, and if the build fails, the operations fall back to their plain-torch twins,
so the package installs and runs without a compiler.

* `merge_with_state`: the log-space merge of local attention with the states' summed
  readout; twin `retentivekv_vllm.core.merge.merge_with_states`.
"""

import functools

import torch
from retentivekv_vllm.csrc import CUDA_SOURCES, Extension, build
from torch import Tensor

from retentivekv_vllm.core.merge import merge_with_states


@functools.cache
def cuda_extension() -> Extension:
    if not torch.cuda.is_available():
        return Extension(None, "no CUDA device")
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return Extension(None, "no CUDA toolkit (set CUDA_HOME or put nvcc on PATH)")
    return build("retentivekv_csrc", list(CUDA_SOURCES), extra_cuda_cflags=["-O3"])


def merge_with_state(
    out_local: Tensor, lse_local: Tensor, numerator: Tensor, denominator: Tensor
) -> Tensor:
    """Merge local attention out_local [..., dv] (lse_local [...]) with a state readout
    (numerator [..., dv], denominator [...], summed over states) -> [..., dv] in
    out_local's dtype; rows with denominator 0 are out_local unchanged."""
    module = cuda_extension().module if out_local.is_cuda else None
    if module is not None:
        return module.merge_with_state(
            out_local, lse_local.float(), numerator.float(), denominator.float()
        )
    return merge_with_states(out_local, lse_local, [numerator], [denominator]).to(out_local.dtype)
