"""`core.self_recall_error` (LoLA's selection rule) against its definition, one token at a time."""

import math

import pytest
import torch

from retentivekv_vllm.core import LearnedFeatureMap, make_feature_map, self_recall_error

HEADS, N, D, DV = 2, 12, 16, 8
SCALE = 1 / math.sqrt(D)


def recall_loop(feature_map, keys, values, members):
    """The definition in float64 with explicit sums: head h's state S = Σ_j φ_k(k_j) v_jᵀ,
    z = Σ_j φ_k(k_j) over its members; token i reads it with φ_q(k_i)."""
    phi_k = feature_map.log_features(keys).double().exp()
    phi_q = feature_map.query_log_features(keys).double().exp()
    v = values.double()
    error = torch.zeros(keys.shape[:2], dtype=torch.float64)
    for h in range(keys.shape[0]):
        for i in range(keys.shape[1]):
            numerator = torch.zeros(v.shape[-1], dtype=torch.float64)
            denominator = torch.zeros((), dtype=torch.float64)
            for j in range(keys.shape[1]):
                if members[h, j]:
                    weight = (phi_q[h, i] * phi_k[h, j]).sum()
                    numerator = numerator + weight * v[h, j]
                    denominator = denominator + weight
            recalled = numerator / denominator if denominator > 0 else numerator
            error[h, i] = torch.linalg.vector_norm(v[h, i] - recalled)
    return error


def inputs(seed=0, key_norm=None):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(HEADS, N, D, generator=generator)
    if key_norm is not None:
        keys = keys / torch.linalg.vector_norm(keys, dim=-1, keepdim=True) * key_norm
    values = torch.randn(HEADS, N, DV, generator=generator)
    members = torch.rand(HEADS, N, generator=generator) < 0.7
    members[:, 0] = False  # a token outside the state is still scored
    members[:, 1] = True
    return keys, values, members


FEATURE_MAPS = {
    "prf": lambda: make_feature_map("prf", D, 32, SCALE, seed=1),
    "elu": lambda: make_feature_map("elu", D, 32, SCALE),
    "learned": lambda: LearnedFeatureMap.initial(HEADS, D, 16, seed=2),
}


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_self_recall_error_equals_the_per_token_loop(name):
    feature_map = FEATURE_MAPS[name]()
    keys, values, members = inputs()
    error = self_recall_error(feature_map, keys, values, members)
    assert error.shape == (HEADS, N) and error.dtype == torch.float32
    expected = recall_loop(feature_map, keys, values, members)
    torch.testing.assert_close(error.double(), expected, rtol=1e-4, atol=1e-5)


def test_large_norm_keys_still_recall():
    """prf features of keys this long are e^-110 or less: 0 in float32. The state is formed with
    its largest key feature factored out (it cancels in the ratio), so it still recalls the
    float64 definition instead of 0 (error ‖v_i‖)."""
    feature_map = make_feature_map("prf", D, 32, SCALE, seed=1)
    keys, values, members = inputs(seed=3, key_norm=40.0)
    assert feature_map.log_features(keys).max() < -110
    error = self_recall_error(feature_map, keys, values, members)
    expected = recall_loop(feature_map, keys, values, members)
    torch.testing.assert_close(error.double(), expected, rtol=1e-3, atol=1e-4)
    assert (error < torch.linalg.vector_norm(values, dim=-1) - 1e-3).any()


def test_a_head_without_members_recalls_nothing():
    feature_map = make_feature_map("prf", D, 32, SCALE, seed=1)
    keys, values, members = inputs()
    members[1] = False
    error = self_recall_error(feature_map, keys, values, members)
    assert torch.isfinite(error).all()
    torch.testing.assert_close(error[1], torch.linalg.vector_norm(values[1], dim=-1))
