"""Select Triton's interpreter for the whole test session when there is no GPU.

Triton reads TRITON_INTERPRET when a @triton.jit function is defined, and that includes its own
library functions (`tl.zeros` and friends), defined when `triton` is first imported. vLLM imports
`triton` while the test modules are collected, so the variable must be set here, before any test
module is imported; set later (in tests/kernels) the kernels were interpreted but `tl.zeros`
inside them was not ("Cannot call @triton.jit'd outside of the scope of a kernel"). The other
tests do not notice: vLLM's CPU build disables Triton whatever the variable says.
"""

import os
import sys

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        raise RuntimeError(
            "triton was imported before tests/conftest.py could select its interpreter; "
            "set TRITON_INTERPRET=1 before running the tests"
        )
    os.environ["TRITON_INTERPRET"] = "1"
