"""The CUDA extension's merge against its twin `merge_with_states`: compiled where CUDA and a
toolkit are present, otherwise the torch fallback, which must be the one chosen on a CPU-only
machine and must give the twin's result."""

import pytest
import torch
from retentivekv_vllm.kernels import cuda_extension, merge_with_state

from retentivekv_vllm.core import (
    RecurrentState,
    fold,
    make_feature_map,
    merge_with_state_readouts,
    merge_with_states,
)

from .paged_batch import DEVICE, DTYPES, assert_close_scaled, tolerance

ROWS, HEADS, HEAD_DIM_V = 5, 3, 48


def merge_inputs(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(9)
    out_local = torch.randn(ROWS, HEADS, HEAD_DIM_V, generator=gen).to(dtype)
    lse_local = 3 * torch.randn(ROWS, HEADS, generator=gen)
    lse_local[0, 0] = float("-inf")  # no live key: the state alone answers
    numerator = torch.randn(ROWS, HEADS, HEAD_DIM_V, generator=gen)
    denominator = torch.rand(ROWS, HEADS, generator=gen) * 50
    denominator[1] = 0.0  # no state mass: the local output, bit for bit
    return out_local, lse_local, numerator, denominator


def test_fallback_is_chosen_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    extension = cuda_extension()
    assert extension.module is None and extension.reason == "no CUDA device"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_equals_twin(dtype):
    out_local, lse_local, numerator, denominator = merge_inputs(dtype)
    expected = merge_with_states(out_local, lse_local, [numerator], [denominator])

    merged = merge_with_state(
        *(x.to(DEVICE) for x in (out_local, lse_local, numerator, denominator))
    )

    assert merged.dtype == dtype and merged.shape == out_local.shape
    assert_close_scaled(merged, expected, tolerance(dtype, 2))
    assert torch.equal(merged[1].cpu(), out_local[1])


def test_readout_merge_through_the_extension_equals_the_torch_merge():
    """The GPU backend's torch rows (`executor.attend_live`) merge the states' summed readout
    with `merge_with_state`: the same result as `merge_with_state_readouts`' own merge."""
    gen = torch.Generator().manual_seed(3)
    heads, rows, dim = 2, 4, 16
    feature_map = make_feature_map("prf", dim, 32, dim**-0.5)
    phi_k = feature_map.features(torch.randn(heads, 9, dim, generator=gen))
    ones = torch.ones(heads, 9)
    values = [torch.randn(heads, 9, dim, generator=gen) for _ in range(2)]
    states = [fold(RecurrentState.zeros(heads, 32, dim), phi_k, v, ones, ones) for v in values]
    q = torch.randn(heads, rows, dim, generator=gen)
    out_local = torch.randn(heads, rows, dim, generator=gen)
    lse = torch.randn(heads, rows, generator=gen)

    merged = merge_with_state_readouts(out_local, lse, q, states, feature_map, merge_with_state)

    expected = merge_with_state_readouts(out_local, lse, q, states, feature_map)
    torch.testing.assert_close(merged, expected)
