"""Kernel tests run on a GPU when there is one, else on CPU tensors through Triton's interpreter.

Triton reads TRITON_INTERPRET when a @triton.jit function is defined (when retentivekv_vllm.kernels
is imported) and again while an interpreted kernel runs, so it is set here, before the test
modules import the kernels, and stays set for the rest of the session. The other tests do not
notice: vLLM's CPU build disables Triton whatever the variable says.
"""

import os
import sys

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    if "retentivekv_vllm.kernels" in sys.modules:
        raise RuntimeError(
            "retentivekv_vllm.kernels was imported before tests/kernels/conftest.py could select "
            "Triton's interpreter; set TRITON_INTERPRET=1 or run tests/kernels in its own pytest run"
        )
    os.environ["TRITON_INTERPRET"] = "1"
