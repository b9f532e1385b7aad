import pytest
import torch

from retentivekv_vllm.core import (
    PositiveRandomFeatures,
    RecurrentState,
    absorption_from_attention,
    fold,
    fold_sequential,
    readout,
    retention_from_entropy,
    storage_dtype,
)

H, N, R, DV = 3, 40, 8, 5


def random_fold_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    state = RecurrentState(torch.randn(H, R, DV, generator=gen), torch.rand(H, R, generator=gen))
    phi_k = torch.rand(H, N, R, generator=gen) + 0.01
    v = torch.randn(H, N, DV, generator=gen)
    gamma = 0.5 + 0.5 * torch.rand(H, N, generator=gen)  # (0.5, 1]
    absorption = 0.5 + 1.5 * torch.rand(H, N, generator=gen)
    return state, phi_k, v, gamma, absorption


def test_fold_in_one_batch_equals_token_by_token():
    state, phi_k, v, gamma, absorption = random_fold_inputs(0)
    batched = fold(state, phi_k, v, gamma, absorption)
    sequential = fold_sequential(state, phi_k, v, gamma, absorption)
    torch.testing.assert_close(batched.S, sequential.S, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.z, sequential.z, atol=1e-5, rtol=1e-5)


def test_fold_in_two_chunks_equals_one():
    state, phi_k, v, gamma, absorption = random_fold_inputs(1)
    split = 17
    first = fold(state, phi_k[:, :split], v[:, :split], gamma[:, :split], absorption[:, :split])
    both = fold(first, phi_k[:, split:], v[:, split:], gamma[:, split:], absorption[:, split:])
    whole = fold(state, phi_k, v, gamma, absorption)
    torch.testing.assert_close(both.S, whole.S, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both.z, whole.z, atol=1e-5, rtol=1e-5)


def test_fold_leaves_its_inputs_untouched():
    state, phi_k, v, gamma, absorption = random_fold_inputs(2)
    before = state.S.clone(), state.z.clone()
    fold(state, phi_k, v, gamma, absorption)
    assert torch.equal(state.S, before[0]) and torch.equal(state.z, before[1])


def test_zeros_state_size():
    state = RecurrentState.zeros(4, 64, 128)
    assert state.S.shape == (4, 64, 128) and state.z.shape == (4, 64)
    assert state.num_elements == 4 * 64 * 129
    assert state.S.dtype == torch.float32 and not state.S.any()


def test_retention_from_entropy_limits():
    entropy_hat = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0])
    gamma = retention_from_entropy(entropy_hat, 0.9)
    torch.testing.assert_close(gamma, torch.tensor([1.0, 0.9, 0.9**0.5, 1.0, 0.9]))


def test_absorption_from_attention_clamps_and_handles_zero_mean():
    alpha = torch.tensor([[0.0, 1.0, 2.0, 100.0], [3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    a = absorption_from_attention(alpha, 0.5, 2.0)
    torch.testing.assert_close(
        a, torch.tensor([[0.5, 0.5, 0.5, 2.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    )


@pytest.mark.parametrize("a_min, a_max", [(0.5, 2.0), (0.1, 10.0)])
def test_absorption_is_ratio_to_mean_inside_the_clamp(a_min, a_max):
    alpha = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(
        absorption_from_attention(alpha, a_min, a_max), (alpha / 2.0).clamp(a_min, a_max)
    )


def test_bfloat16_states_read_back_what_float32_states_hold():
    """The readout of a state stored in bfloat16 is the float32 state's to bfloat16's precision
    (the engine widens it before reading)."""
    generator = torch.Generator().manual_seed(0)
    feature_map = PositiveRandomFeatures(64, 32, scale=64**-0.5, seed=1)
    keys, values = (torch.randn(2, 100, 64, generator=generator) for _ in range(2))
    ones = torch.ones(2, 100)
    state = fold(RecurrentState.zeros(2, 32, 64), feature_map.features(keys), values, ones, ones)
    stored = state.stored_as(storage_dtype(torch.bfloat16))
    assert stored.S.dtype == torch.bfloat16 and storage_dtype(torch.float16) == torch.bfloat16
    assert state.stored_as(storage_dtype(torch.float32)).S.dtype == torch.float32
    phi_q = feature_map.features(torch.randn(2, 5, 64, generator=generator))
    (num, den), (num16, den16) = readout(state, phi_q), readout(stored, phi_q)
    out, out16 = num / den[..., None], num16 / den16[..., None]
    assert torch.linalg.vector_norm(out16 - out) < 1e-2 * torch.linalg.vector_norm(out)
    assert not torch.equal(num16, num)  # it was rounded
