import pytest
import torch

from retentivekv_vllm.core import (
    RecurrentState,
    compressed_attention,
    fold,
    local_attention,
    make_feature_map,
    merge_with_states,
)


def full_attention_gqa(q, k, v, scale):
    """Plain causal attention, one query head at a time: q [T, Hq, d], k/v [T, Hkv, d] -> [T, Hq,
    dv]."""
    T, Hq, _ = q.shape
    group = Hq // k.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    outs = []
    for head in range(Hq):
        kv_head = head // group
        logits = scale * q[:, head] @ k[:, kv_head].T
        outs.append(
            torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1) @ v[:, kv_head]
        )
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("states", ["none", "zeros"])
def test_nothing_folded_is_full_attention(states):
    gen = torch.Generator().manual_seed(0)
    T, Hq, Hkv, d = 13, 4, 2, 16
    group = Hq // Hkv
    q = torch.randn(T, Hq, d, generator=gen)
    k, v = torch.randn(T, Hkv, d, generator=gen), torch.randn(T, Hkv, d, generator=gen)
    scale = d**-0.5
    # Group the query heads of each KV head as rows: [T, Hq, d] -> [Hkv, group·T, d].
    q_rows = q.reshape(T, Hkv, group, d).permute(1, 2, 0, 3).reshape(Hkv, group * T, d)
    positions = torch.arange(T)
    feature_map = make_feature_map("prf", d, 32, scale)
    state_list = (
        []
        if states == "none"
        else [RecurrentState.zeros(Hkv, 32, d), RecurrentState.zeros(Hkv, 32, d)]
    )
    out = compressed_attention(
        q_rows,
        k.transpose(0, 1),
        v.transpose(0, 1),
        scale,
        positions.repeat(group),
        positions,
        torch.ones(Hkv, T, dtype=torch.bool),
        state_list,
        feature_map,
    )
    out = out.reshape(Hkv, group, T, d).permute(2, 0, 1, 3).reshape(T, Hq, d)
    torch.testing.assert_close(out, full_attention_gqa(q, k, v, scale), atol=1e-5, rtol=1e-5)


def test_local_attention_lse_and_empty_rows():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 4, generator=gen) for _ in range(3))
    key_mask = torch.tensor([[True, True, True], [False, True, True]])
    out, lse = local_attention(q, k, v, 0.5, torch.arange(3), torch.arange(3), key_mask)
    logits = 0.5 * q[0] @ k[0].T
    expected_lse = torch.logsumexp(
        logits.masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(), float("-inf")), -1
    )
    torch.testing.assert_close(lse[0], expected_lse)
    assert lse[1, 0] == float("-inf") and torch.all(out[1, 0] == 0)


def random_merge_inputs(seed, lse, den):
    """out_local [2, m, 3] with the given lse [2, m]; one state whose readout has the given den [2,
    m]."""
    gen = torch.Generator().manual_seed(seed)
    out_local = torch.randn(*lse.shape, 3, generator=gen)
    numerator = den[..., None] * torch.randn(*lse.shape, 3, generator=gen)
    return out_local, numerator


def direct_merge_float64(out_local, lse, numerators, denominators):
    weight = lse.double().exp()[..., None]
    num = sum(n.double() for n in numerators)
    den = sum(d.double() for d in denominators)
    return (weight * out_local.double() + num) / (weight + den[..., None])


def test_merge_with_one_state_equals_direct_formula():
    lse = torch.tensor([[0.0, 1.5, -2.0, 3.0], [0.5, -1.0, 2.0, 0.1]])
    den = torch.tensor([[1.0, 0.1, 5.0, 20.0], [3.0, 0.5, 1.0, 2.0]])
    out_local, numerator = random_merge_inputs(2, lse, den)
    merged = merge_with_states(out_local, lse, [numerator], [den])
    expected = direct_merge_float64(out_local, lse, [numerator], [den])
    torch.testing.assert_close(merged.double(), expected, atol=1e-6, rtol=1e-5)


def test_merge_with_two_states_equals_direct_formula():
    lse = torch.tensor([[0.0, 1.5], [0.5, -1.0]])
    dens = [torch.tensor([[1.0, 0.1], [3.0, 0.5]]), torch.tensor([[2.0, 4.0], [0.2, 0.0]])]
    out_local, num_a = random_merge_inputs(3, lse, dens[0])
    _, num_b = random_merge_inputs(4, lse, dens[1])
    merged = merge_with_states(out_local, lse, [num_a, num_b], dens)
    expected = direct_merge_float64(out_local, lse, [num_a, num_b], dens)
    torch.testing.assert_close(merged.double(), expected, atol=1e-6, rtol=1e-5)


def test_merge_does_not_overflow_for_large_lse():
    # e^200 overflows float32 (max ≈ e^88.7); float64 holds it, so the direct formula is the
    # reference.
    lse = torch.tensor([[200.0, 200.0, 85.0, 69.0, -50.0]])
    den = torch.tensor([[1.0, 1e38, 1e37, 1e30, 1e-30]])
    out_local, numerator = random_merge_inputs(5, lse, den)
    merged = merge_with_states(out_local, lse, [numerator], [den])
    assert torch.isfinite(merged).all()
    expected = direct_merge_float64(out_local, lse, [numerator], [den])
    torch.testing.assert_close(merged.double(), expected, atol=1e-6, rtol=1e-5)


def test_merge_without_state_mass_returns_local_output_bitwise():
    lse = torch.tensor([[0.3, float("-inf"), 7.0], [1.0, -2.0, float("-inf")]])
    out_local = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(6))
    out_local[0, 1] = 0  # a row with no visible key
    out_local[0, 2, 0] = -0.0
    zeros_num, zeros_den = torch.zeros(2, 3, 4), torch.zeros(2, 3)
    assert torch.equal(merge_with_states(out_local, lse, [], []), out_local)
    merged = merge_with_states(out_local, lse, [zeros_num, zeros_num], [zeros_den, zeros_den])
    assert torch.equal(merged.view(torch.int32), out_local.view(torch.int32))


def test_merge_with_no_local_keys_is_the_state_mean():
    lse = torch.tensor([[float("-inf")]])
    den = torch.tensor([[4.0]])
    numerator = torch.tensor([[[2.0, -8.0]]])
    merged = merge_with_states(torch.zeros(1, 1, 2), lse, [numerator], [den])
    torch.testing.assert_close(merged, numerator / 4.0)


def test_sharp_query_readout_is_exact_in_log_space():
    """A large-norm query's prf features are all below float32's range (log φ(q) ≈ −300), so
    reading the state with φ(q) itself gives den = 0 and drops the state; the merge reads it
    through log φ(q) instead. The kept part's lse is set near the state's own log-mass so that
    both shares matter; the oracle is the merge formula in float64 log space, with leading batch
    dims (requests decoded together)."""
    from retentivekv_vllm.core import merge_with_state_readouts

    gen = torch.Generator().manual_seed(4)
    batch, heads, m, d, rank, n_folded = 2, 2, 3, 16, 32, 7
    scale = d**-0.5
    direction = torch.nn.functional.normalize(
        torch.randn(batch, heads, 1, d, generator=gen), dim=-1
    )
    q = (25.0 / scale**0.5) * direction + 0.3 * torch.randn(batch, heads, m, d, generator=gen)
    k_folded = (2.0 / scale**0.5) * direction + 0.3 * torch.randn(
        batch, heads, n_folded, d, generator=gen
    )
    v_folded = torch.randn(batch, heads, n_folded, d, generator=gen)
    feature_map = make_feature_map("prf", d, rank, scale)
    assert (feature_map.query_features(q) == 0).all()  # the case the log-space readout exists for

    flat = lambda x: x.reshape(batch * heads, *x.shape[2:])  # noqa: E731
    ones = torch.ones(batch * heads, n_folded)
    folded = fold(
        RecurrentState.zeros(batch * heads, rank, d),
        feature_map.features(flat(k_folded)),
        flat(v_folded),
        ones,
        ones,
    )
    state = RecurrentState(folded.S.view(batch, heads, rank, d), folded.z.view(batch, heads, rank))
    log_phi_q = feature_map.log_features(q).double()
    log_phi_k = feature_map.log_features(k_folded).double()
    log_kernel = torch.logsumexp(log_phi_q[..., :, None, :] + log_phi_k[..., None, :, :], -1)
    log_den = torch.logsumexp(log_kernel, -1)  # [B, H, m], around −250
    assert (log_den < -100).all()
    lse = (
        log_den + 2 * torch.rand(batch, heads, m, generator=gen, dtype=torch.float64) - 1
    ).float()
    out_local = torch.randn(batch, heads, m, d, generator=gen)
    got = merge_with_state_readouts(out_local, lse, q, [state], feature_map)

    out_state = torch.softmax(log_kernel, -1) @ v_folded.double()
    state_share = torch.sigmoid(log_den - lse.double())[..., None]
    expected = (1 - state_share) * out_local.double() + state_share * out_state
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
