"""The state fold kernels against their naive twins: `fold_chunked` against `core.state.fold`,
`fold_fused_recurrent` against the one-token-at-a-time definition `core.state.fold_sequential`."""

import pytest
import torch

from retentivekv_vllm.core import (
    EluPlusOne,
    PositiveRandomFeatures,
    RecurrentState,
    fold,
    fold_sequential,
    retention_from_entropy,
)
from retentivekv_vllm.kernels import fold_chunked, fold_fused_recurrent

from .paged_batch import DEVICE, DTYPES, assert_close_scaled, tolerance

NUM_HEADS = 3
HEAD_DIM = 20  # not a power of two: padded tiles
HEAD_DIM_V = 40  # two value tiles, the second partial
PRF_RANK = 24

FEATURE_MAPS = {
    "given": lambda: None,  # the kernel is handed φ(k) itself
    "elu": lambda: EluPlusOne(HEAD_DIM),
    "prf": lambda: PositiveRandomFeatures(HEAD_DIM, PRF_RANK, scale=HEAD_DIM**-0.5, seed=3),
}
KERNELS = {"chunked": (fold_chunked, fold), "fused_recurrent": (fold_fused_recurrent, fold_sequential)}


def fold_inputs(num_tokens: int, feature: str, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    feature_map = FEATURE_MAPS[feature]()
    rank = HEAD_DIM if feature_map is None else feature_map.rank
    # Tokens-major storage viewed head-major, like keys gathered from a cache: strided inputs.
    x = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, generator=gen).to(dtype).transpose(0, 1)
    if feature_map is None:
        x = x.abs()  # features are positive
    v = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM_V, generator=gen).to(dtype).transpose(0, 1)
    gamma = retention_from_entropy(torch.rand(NUM_HEADS, num_tokens, generator=gen), gamma0=0.3)
    absorption = 0.5 + 1.5 * torch.rand(NUM_HEADS, num_tokens, generator=gen)
    state = RecurrentState(
        S=torch.randn(NUM_HEADS, rank, HEAD_DIM_V, generator=gen),
        z=torch.rand(NUM_HEADS, rank, generator=gen),
    )
    return feature_map, x, v, gamma, absorption, state


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", sorted(FEATURE_MAPS))
@pytest.mark.parametrize(
    "kernel, num_tokens",
    # 45: a full chunk of 32 and a partial one; the fused recurrent kernel is for a few tokens.
    [("chunked", 0), ("chunked", 1), ("chunked", 5), ("chunked", 45), ("fused_recurrent", 0),
     ("fused_recurrent", 1), ("fused_recurrent", 5)],
)
def test_fold_equals_naive_twin(kernel, feature, dtype, num_tokens):
    launch, twin = KERNELS[kernel]
    feature_map, x, v, gamma, absorption, state = fold_inputs(num_tokens, feature, dtype, seed=num_tokens)
    phi_k = x.float() if feature_map is None else feature_map.features(x)
    expected = twin(state, phi_k, v, gamma, absorption)

    on_device = RecurrentState(state.S.to(DEVICE), state.z.to(DEVICE))
    returned = launch(
        on_device, x.to(DEVICE), v.to(DEVICE), gamma.to(DEVICE), absorption.to(DEVICE), feature_map
    )

    assert returned is on_device  # updated in place
    # Float32 throughout (the inputs are the same rounded values): one reduction over the tokens
    # plus the old state, and the random features' own sum over the head dim.
    tol = tolerance(torch.float32, num_tokens + 1 + HEAD_DIM)
    assert_close_scaled(on_device.S, expected.S, tol)
    assert_close_scaled(on_device.z, expected.z, tol)


def test_fold_over_many_chunks():
    """Seven chunks with γ = 0.5: the old state decays to 0 in float32 and only the newest tokens
    count, whichever chunk they fall in."""
    feature_map, x, v, _, absorption, state = fold_inputs(200, "elu", torch.float32, seed=7)
    gamma = torch.full((NUM_HEADS, 200), 0.5)
    expected = fold(state, feature_map.features(x), v, gamma, absorption)
    on_device = RecurrentState(state.S.to(DEVICE), state.z.to(DEVICE))
    fold_chunked(on_device, x.to(DEVICE), v.to(DEVICE), gamma.to(DEVICE), absorption.to(DEVICE), feature_map)
    assert_close_scaled(on_device.S, expected.S, tolerance(torch.float32, 200 + 1))


def test_rank_mismatch_is_refused():
    feature_map, x, v, gamma, absorption, _ = fold_inputs(3, "prf", torch.float32, seed=0)
    wrong = RecurrentState.zeros(NUM_HEADS, HEAD_DIM, HEAD_DIM_V, device=DEVICE)
    with pytest.raises(ValueError, match="state rank"):
        fold_chunked(wrong, x.to(DEVICE), v.to(DEVICE), gamma.to(DEVICE), absorption.to(DEVICE), feature_map)
