import torch

from retentivekv_vllm.core import (
    PositiveRandomFeatures,
    RecurrentState,
    compressed_attention,
    fold,
    local_attention,
    readout,
)


def test_readout_is_phi_q_times_state():
    gen = torch.Generator().manual_seed(0)
    state = RecurrentState(torch.randn(2, 6, 3, generator=gen), torch.rand(2, 6, generator=gen))
    phi_q = torch.rand(2, 4, 6, generator=gen)
    numerator, denominator = readout(state, phi_q)
    torch.testing.assert_close(numerator, torch.einsum("hmr,hrd->hmd", phi_q, state.S))
    torch.testing.assert_close(denominator, torch.einsum("hmr,hr->hm", phi_q, state.z))


def test_kept_keys_plus_folded_state_approximates_full_attention():
    # With γ = a = 1 and unbiased random features the state estimates exactly the softmax terms of
    # the
    # folded keys, so the merged output must land far closer to full attention than eviction alone
    # does.
    gen = torch.Generator().manual_seed(1)
    H, n, m, d, rank = 2, 96, 8, 16, 4096
    scale = d**-0.5
    k = 0.5 * torch.randn(H, n, d, generator=gen)
    v = torch.randn(H, n, d, generator=gen)
    # Queries aligned with the folded half make that half carry most of the attention mass.
    folded = torch.zeros(H, n, dtype=torch.bool)
    folded[:, torch.randperm(n, generator=gen)[: n // 2]] = True
    q = 0.5 * torch.randn(H, m, d, generator=gen) + 2.0 * k[folded].reshape(H, n // 2, d).mean(
        1, keepdim=True
    )
    k_positions, q_positions = torch.arange(n), torch.arange(n, n + m)

    feature_map = PositiveRandomFeatures(d, rank, scale, seed=0)
    k_folded, v_folded = k[folded].reshape(H, n // 2, d), v[folded].reshape(H, n // 2, d)
    ones = torch.ones(H, n // 2)
    state = fold(
        RecurrentState.zeros(H, rank, d), feature_map.features(k_folded), v_folded, ones, ones
    )

    full, _ = local_attention(q, k, v, scale, q_positions, k_positions)
    evicted, _ = local_attention(q, k, v, scale, q_positions, k_positions, key_mask=~folded)
    merged = compressed_attention(
        q, k, v, scale, q_positions, k_positions, ~folded, [state], feature_map
    )

    merged_error = (merged - full).norm() / full.norm()
    eviction_error = (evicted - full).norm() / full.norm()
    assert (
        eviction_error > 0.3
    )  # the folded half matters, so the test can tell a working state from none
    assert merged_error < 0.2 * eviction_error


def test_fixed_query_readout_weighs_every_folded_token_alike():
    """The no-query-conditioned-retrieval ablation: every query reads the state through φ(0)
    (for elu the all-ones vector), so with γ = a = 1 the merged output is
    (e^lse·o_L + Σ_i (1ᵀφ(k_i))·v_i) / (e^lse + Σ_i 1ᵀφ(k_i)) for every query, computed here
    directly in float64."""
    from retentivekv_vllm.core import (
        EluPlusOne,
        FixedQuery,
        RecurrentState,
        compressed_attention,
        fold,
    )

    generator = torch.Generator().manual_seed(3)
    heads, m, n, folded, d = 2, 5, 12, 9, 8
    scale = d**-0.5
    q = torch.randn(heads, m, d, generator=generator)
    k = torch.randn(heads, n, d, generator=generator)
    v = torch.randn(heads, n, d, generator=generator)
    k_folded = torch.randn(heads, folded, d, generator=generator)
    v_folded = torch.randn(heads, folded, d, generator=generator)
    feature_map = FixedQuery(EluPlusOne(d))
    ones = torch.ones(heads, folded)
    state = fold(
        RecurrentState.zeros(heads, d, d), feature_map.features(k_folded), v_folded, ones, ones
    )
    positions = torch.arange(n)
    q_positions = torch.full((m,), n)
    got = compressed_attention(
        q,
        k,
        v,
        scale,
        q_positions,
        positions,
        torch.ones(heads, n, dtype=torch.bool),
        [state],
        feature_map,
    )
    logits = scale * q.double() @ k.double().transpose(1, 2)  # [H, m, n]
    weight_folded = (torch.nn.functional.elu(k_folded.double()) + 1).sum(-1)  # [H, folded]
    num = logits.exp() @ v.double() + (weight_folded[:, None, :] @ v_folded.double())
    den = logits.exp().sum(-1, keepdim=True) + weight_folded.sum(-1)[:, None, None]
    torch.testing.assert_close(got.double(), num / den, rtol=1e-5, atol=1e-6)


def test_scaled_readout_divides_by_the_maps_estimate_of_one_and_applies_the_gain():
    """ScaledReadout's query features are φ(q)·g / (φ(q)·φ(0)), φ(0) the key-side map at 0, so
    a state read through them returns g·Σ_i φ(q)·φ(k_i) / φ(q)·φ(0) (float64 oracle)."""
    import math

    from retentivekv_vllm.core import ScaledReadout

    gen = torch.Generator().manual_seed(8)
    heads, m, n, d, rank = 2, 4, 6, 8, 16
    scale = d**-0.5
    inner = PositiveRandomFeatures(d, rank, scale, seed=1)
    q = 3 * torch.randn(heads, m, d, generator=gen)
    k = torch.randn(heads, n, d, generator=gen)
    feature_map = ScaledReadout(inner, log_gain=2.5, normalise=True)
    ones = torch.ones(heads, n)
    state = fold(
        RecurrentState.zeros(heads, rank, d),
        feature_map.features(k),
        torch.randn(heads, n, d),
        ones,
        ones,
    )
    _, den = readout(state, feature_map.query_features(q))
    phi_q, phi_k = inner.features(q).double(), inner.features(k).double()
    phi_zero = inner.features(torch.zeros(d)).double()
    expected = math.exp(2.5) * (phi_q @ phi_k.transpose(1, 2)).sum(-1) / (phi_q @ phi_zero)
    torch.testing.assert_close(den.double(), expected, rtol=1e-5, atol=0)
    assert torch.equal(feature_map.log_features(k), inner.log_features(k))  # keys fold as before
    plain = ScaledReadout(inner, log_gain=-1.0)
    torch.testing.assert_close(plain.query_log_features(q), inner.log_features(q) - 1.0)


def test_normalised_readout_keeps_a_sharp_query_on_scale():
    """For a large-norm query the unbiased prf estimate of exp(scale·q·k) is typically hundreds of
    nats below it (the −‖q̃‖²/2 of the dominant feature is not made up at any practical rank);
    the ratio estimator stays within tens (docs/results.md section 6)."""
    from retentivekv_vllm.core import ScaledReadout

    gen = torch.Generator().manual_seed(9)
    d, rank = 64, 64
    scale = d**-0.5
    inner = PositiveRandomFeatures(d, rank, scale, seed=0)
    direction = torch.nn.functional.normalize(torch.randn(32, d, generator=gen), dim=-1)
    q = (28 / scale**0.5) * direction  # ‖q̃‖ = 28, as the recall model's matching head
    k = (2.3 / scale**0.5) * direction  # an aligned key: scale·q·k = 64.4
    log_true = scale * (q * k).sum(-1)
    unbiased = torch.logsumexp(inner.log_features(q) + inner.log_features(k), -1)
    ratio = torch.logsumexp(
        ScaledReadout(inner, normalise=True).query_log_features(q) + inner.log_features(k), -1
    )
    assert (unbiased - log_true).median() < -200
    assert (ratio - log_true).abs().median() < 80
    assert ((ratio - log_true).abs() < (unbiased - log_true).abs()).all()
