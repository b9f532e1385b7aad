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
    # With γ = a = 1 and unbiased random features the state estimates exactly the softmax terms of the
    # folded keys, so the merged output must land far closer to full attention than eviction alone does.
    gen = torch.Generator().manual_seed(1)
    H, n, m, d, rank = 2, 96, 8, 16, 4096
    scale = d**-0.5
    k = 0.5 * torch.randn(H, n, d, generator=gen)
    v = torch.randn(H, n, d, generator=gen)
    # Queries aligned with the folded half make that half carry most of the attention mass.
    folded = torch.zeros(H, n, dtype=torch.bool)
    folded[:, torch.randperm(n, generator=gen)[: n // 2]] = True
    q = 0.5 * torch.randn(H, m, d, generator=gen) + 2.0 * k[folded].reshape(H, n // 2, d).mean(1, keepdim=True)
    k_positions, q_positions = torch.arange(n), torch.arange(n, n + m)

    feature_map = PositiveRandomFeatures(d, rank, scale, seed=0)
    k_folded, v_folded = k[folded].reshape(H, n // 2, d), v[folded].reshape(H, n // 2, d)
    ones = torch.ones(H, n // 2)
    state = fold(RecurrentState.zeros(H, rank, d), feature_map.features(k_folded), v_folded, ones, ones)

    full, _ = local_attention(q, k, v, scale, q_positions, k_positions)
    evicted, _ = local_attention(q, k, v, scale, q_positions, k_positions, key_mask=~folded)
    merged = compressed_attention(q, k, v, scale, q_positions, k_positions, ~folded, [state], feature_map)

    merged_error = (merged - full).norm() / full.norm()
    eviction_error = (evicted - full).norm() / full.norm()
    assert eviction_error > 0.3  # the folded half matters, so the test can tell a working state from none
    assert merged_error < 0.2 * eviction_error


def test_fixed_query_readout_weighs_every_folded_token_alike():
    """The no-query-conditioned-retrieval ablation: every query reads the state through φ(0)
    (for elu the all-ones vector), so with γ = a = 1 the merged output is
    (e^lse·o_L + Σ_i (1ᵀφ(k_i))·v_i) / (e^lse + Σ_i 1ᵀφ(k_i)) for every query, computed here
    directly in float64."""
    from retentivekv_vllm.core import EluPlusOne, FixedQuery, RecurrentState, compressed_attention, fold

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
    state = fold(RecurrentState.zeros(heads, d, d), feature_map.features(k_folded), v_folded, ones, ones)
    positions = torch.arange(n)
    q_positions = torch.full((m,), n)
    got = compressed_attention(
        q, k, v, scale, q_positions, positions, torch.ones(heads, n, dtype=torch.bool), [state], feature_map
    )
    logits = scale * q.double() @ k.double().transpose(1, 2)  # [H, m, n]
    weight_folded = (torch.nn.functional.elu(k_folded.double()) + 1).sum(-1)  # [H, folded]
    num = logits.exp() @ v.double() + (weight_folded[:, None, :] @ v_folded.double())
    den = logits.exp().sum(-1, keepdim=True) + weight_folded.sum(-1)[:, None, None]
    torch.testing.assert_close(got.double(), num / den, rtol=1e-5, atol=1e-6)
