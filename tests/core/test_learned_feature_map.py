import math

import pytest
import torch

from retentivekv_vllm.core import (
    LearnedFeatureMap,
    RecurrentState,
    absorption_from_attention,
    fold,
    local_attention,
    merge_with_state_readouts,
)

HEADS, DIM, RANK = 3, 8, 6


def trained_like_map(seed: int = 0) -> LearnedFeatureMap:
    """A map with every parameter away from its initial value (magnitudes and scales included)."""
    gen = torch.Generator().manual_seed(seed)
    half = RANK // 2
    return LearnedFeatureMap(
        torch.randn(HEADS, DIM, half, generator=gen),
        torch.randn(HEADS, DIM, half, generator=gen),
        0.3 * torch.randn(HEADS, DIM, generator=gen),
        0.3 * torch.randn(HEADS, DIM, generator=gen),
        torch.randn(HEADS, RANK, generator=gen),
    )


def naive_features(x, weight, magnitude, log_scale):
    """φ(x) for one head and one vector, written out: [softmax(xW), softmax(−xW)]·e^{x·u}·s."""
    logits = x.double() @ weight.double()
    halves = torch.cat([torch.softmax(logits, -1), torch.softmax(-logits, -1)])
    return halves * torch.exp(x.double() @ magnitude.double()) * log_scale.double().exp()


def test_log_features_match_the_definition_per_head():
    feature_map = trained_like_map()
    gen = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(2, HEADS, 5, DIM, generator=gen)  # a leading batch dim, as decode has
    keys = feature_map.log_features(x).exp().double()
    queries = feature_map.query_log_features(x).exp().double()
    assert keys.shape == queries.shape == (2, HEADS, 5, RANK)
    for b in range(2):
        for h in range(HEADS):
            for i in range(5):
                expected_k = naive_features(
                    x[b, h, i],
                    feature_map.key_weight[h],
                    feature_map.key_log_magnitude[h],
                    feature_map.key_log_scale[h],
                )
                expected_q = naive_features(
                    x[b, h, i],
                    feature_map.query_weight[h],
                    feature_map.query_log_magnitude[h],
                    torch.zeros(RANK),
                )
                torch.testing.assert_close(keys[b, h, i], expected_k, rtol=1e-5, atol=0)
                torch.testing.assert_close(queries[b, h, i], expected_q, rtol=1e-5, atol=0)


def test_log_features_stay_finite_where_features_underflow():
    feature_map = trained_like_map()
    x = torch.full((HEADS, 1, DIM), 300.0)  # e^{x·u} far outside float32 for some heads
    assert torch.isfinite(feature_map.query_log_features(x)).all()
    assert torch.isfinite(feature_map.log_features(x)).all()


def test_initial_map_shapes_and_small_key_scale():
    feature_map = LearnedFeatureMap.initial(HEADS, DIM, RANK, key_scale=1e-4, seed=3)
    assert (
        feature_map.rank == RANK and feature_map.num_heads == HEADS and feature_map.head_dim == DIM
    )
    x = torch.randn(HEADS, 4, DIM)
    # No magnitude terms yet: each softmax half sums to one, times the scale.
    torch.testing.assert_close(feature_map.features(x).sum(-1), torch.full((HEADS, 4), 2e-4))
    torch.testing.assert_close(feature_map.query_features(x).sum(-1), torch.full((HEADS, 4), 2.0))
    with pytest.raises(ValueError, match="even"):
        LearnedFeatureMap.initial(HEADS, DIM, 5)


def test_mismatched_parameter_shapes_are_named():
    good = trained_like_map()
    with pytest.raises(ValueError, match="key_log_scale"):
        LearnedFeatureMap(
            good.query_weight,
            good.key_weight,
            good.query_log_magnitude,
            good.key_log_magnitude,
            torch.zeros(HEADS, RANK + 2),
        )


def attention_case(seed: int = 2, n: int = 24, m: int = 5):
    gen = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(HEADS, m, DIM, generator=gen)
    k = 2 * torch.randn(HEADS, n, DIM, generator=gen)
    v = torch.randn(HEADS, n, DIM, generator=gen)
    folded = torch.zeros(HEADS, n, dtype=torch.bool)
    folded[:, 4:16] = True
    return q, k, v, folded


def test_merged_output_with_a_learned_state_matches_the_float64_formula():
    """Fold the marked tokens with the learned map, read them back and merge: equals
    (Σ_kept e^{s·q·k} v + Σ_folded w_j φ_q(q)·φ_k(k_j) v_j) / (same without v),
    w_j = a_j·∏_{i>j} γ_i."""
    feature_map = trained_like_map()
    q, k, v, folded = attention_case()
    scale = DIM**-0.5
    n = k.shape[1]
    index = folded.nonzero()[:, 1].view(HEADS, -1)
    gen = torch.Generator().manual_seed(4)
    gamma = 0.8 + 0.2 * torch.rand(index.shape, generator=gen)
    absorption = absorption_from_attention(torch.rand(index.shape, generator=gen), 0.5, 2.0)

    def take(x):
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

    state = fold(
        RecurrentState.zeros(HEADS, RANK, DIM),
        feature_map.features(take(k)),
        take(v),
        gamma,
        absorption,
    )
    positions = torch.arange(n)
    q_positions = torch.full((q.shape[1],), n)
    out_local, lse = local_attention(q, k, v, scale, q_positions, positions, ~folded)
    merged = merge_with_state_readouts(out_local, lse, q, [state], feature_map)

    decay_after = torch.stack(
        [
            torch.cat([gamma[h, j + 1 :].double().prod()[None] for j in range(gamma.shape[1])])
            for h in range(HEADS)
        ]
    )
    weight = absorption.double() * decay_after
    phi_q = feature_map.query_log_features(q).double().exp()
    phi_k = feature_map.log_features(take(k)).double().exp()
    for h in range(HEADS):
        kept_logits = scale * q[h].double() @ k[h, ~folded[h]].double().T
        kernel = phi_q[h] @ (weight[h, :, None] * phi_k[h]).T  # [m, f]
        numerator = kept_logits.exp() @ v[h, ~folded[h]].double() + kernel @ take(v)[h].double()
        denominator = kept_logits.exp().sum(-1) + kernel.sum(-1)
        torch.testing.assert_close(
            merged[h].double(), numerator / denominator[:, None], rtol=1e-4, atol=1e-5
        )


def test_untrained_state_leaves_the_kept_cache_output_almost_unchanged():
    feature_map = LearnedFeatureMap.initial(HEADS, DIM, RANK, key_scale=1e-4, seed=0)
    q, k, v, folded = attention_case()
    index = folded.nonzero()[:, 1].view(HEADS, -1)

    def take(x):
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

    ones = torch.ones(index.shape)
    state = fold(
        RecurrentState.zeros(HEADS, RANK, DIM), feature_map.features(take(k)), take(v), ones, ones
    )
    out_local, lse = local_attention(
        q, k, v, DIM**-0.5, torch.full((q.shape[1],), k.shape[1]), torch.arange(k.shape[1]), ~folded
    )
    merged = merge_with_state_readouts(out_local, lse, q, [state], feature_map)
    # The state's share is at most 2e-4·(folded count)/(kept mass) of the row.
    share_bound = 2e-4 * index.shape[1] / lse.exp().min()
    assert (merged - out_local).abs().max() <= 2 * share_bound * v.abs().max()
    assert not torch.equal(merged, out_local)


def test_learned_map_is_differentiable_through_fold_and_merge():
    feature_map = LearnedFeatureMap.initial(HEADS, DIM, RANK, seed=0)
    for p in feature_map.parameters():
        p.requires_grad_(True)
    q, k, v, folded = attention_case()
    index = folded.nonzero()[:, 1].view(HEADS, -1)

    def take(x):
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

    ones = torch.ones(index.shape)
    state = fold(
        RecurrentState.zeros(HEADS, RANK, DIM), feature_map.features(take(k)), take(v), ones, ones
    )
    out_local, lse = local_attention(
        q, k, v, DIM**-0.5, torch.full((q.shape[1],), k.shape[1]), torch.arange(k.shape[1]), ~folded
    )
    merge_with_state_readouts(out_local, lse, q, [state], feature_map).square().sum().backward()
    for p in feature_map.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert math.isfinite(float(feature_map.key_log_scale.grad.sum()))
