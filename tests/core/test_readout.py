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
