import math

import pytest
import torch

from retentivekv_vllm.core import (
    accumulated_attention,
    attention_probs,
    entropy_potential,
    gather_tokens,
    normalize_by_max,
    pool1d,
    retention_score,
    select_topk,
)


def naive_attention_probs(q, k, scale, q_positions, k_positions, key_mask):
    """Row by row, in float64: softmax over the keys that are causally visible and not masked."""
    H, m, n = q.shape[0], q.shape[1], k.shape[1]
    probs = torch.zeros(H, m, n, dtype=torch.float64)
    for h in range(H):
        for i in range(m):
            visible = [j for j in range(n) if k_positions[j] <= q_positions[i] and key_mask[h, j]]
            if not visible:
                continue
            logits = {j: scale * float(q[h, i].double() @ k[h, j].double()) for j in visible}
            top = max(logits.values())
            total = sum(math.exp(x - top) for x in logits.values())
            for j in visible:
                probs[h, i, j] = math.exp(logits[j] - top) / total
    return probs


def naive_entropy_potential(probs, subset):
    H, m, n = probs.shape
    out = torch.zeros(H, n, dtype=torch.float64)
    for h in range(H):
        members = [j for j in range(n) if subset[h, j]]
        for i in range(m):
            mass = sum(float(probs[h, i, j]) for j in members)
            if mass == 0:
                continue
            for j in members:
                p = float(probs[h, i, j]) / mass
                if p > 0:
                    out[h, j] -= p * math.log(p)
        out[h] /= math.log(max(len(members), 2))
    return out


def test_attention_probs_matches_loop_with_causality_and_mask():
    gen = torch.Generator().manual_seed(0)
    H, m, n, d = 2, 5, 9, 8
    q, k = torch.randn(H, m, d, generator=gen), torch.randn(H, n, d, generator=gen)
    k_positions = torch.arange(n)
    q_positions = torch.tensor([0, 3, 4, 7, 8])  # a prefill chunk that sees only part of the keys
    key_mask = torch.rand(H, n, generator=gen) > 0.3
    key_mask[1, 0] = False  # head 1, row 0 (position 0) then sees no key at all
    probs = attention_probs(q, k, 0.35, q_positions, k_positions, key_mask)
    expected = naive_attention_probs(q, k, 0.35, q_positions, k_positions, key_mask)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.double(), expected, atol=1e-6, rtol=1e-5)
    assert torch.all(probs[1, 0] == 0)
    torch.testing.assert_close(
        accumulated_attention(probs).double(), expected.sum(1), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("subset_kind", ["none", "shared", "per_head"])
def test_entropy_potential_matches_loop(subset_kind):
    gen = torch.Generator().manual_seed(1)
    H, m, n = 3, 6, 11
    probs = torch.softmax(3 * torch.randn(H, m, n, generator=gen), dim=-1)
    probs[0, 2, :] = 0  # a row with no mass, e.g. a query that saw nothing
    subset = {
        "none": None,
        "shared": torch.rand(n, generator=gen) > 0.4,
        "per_head": torch.rand(H, n, generator=gen) > 0.4,
    }[subset_kind]
    if (
        subset_kind == "per_head"
    ):  # one- and two-key subsets, where the log(max(|subset|, 2)) floor applies
        subset[1:] = False
        subset[1, [2, 5]] = True
        subset[2, 7] = True
    full_subset = torch.ones(H, n, dtype=torch.bool) if subset is None else subset.expand(H, n)
    result = entropy_potential(probs, subset)
    torch.testing.assert_close(
        result.double(), naive_entropy_potential(probs, full_subset), atol=1e-6, rtol=1e-5
    )
    assert torch.all(result[~full_subset] == 0)


@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_pool1d_matches_loop(kernel):
    x = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(2))
    expected = torch.empty_like(x)
    half = kernel // 2
    for j in range(x.shape[-1]):
        lo, hi = max(0, j - half), min(x.shape[-1], j + half + 1)
        expected[..., j] = x[..., lo:hi].mean(-1)
    torch.testing.assert_close(pool1d(x, kernel), expected)


def test_pool1d_rejects_even_kernel():
    with pytest.raises(ValueError, match="odd"):
        pool1d(torch.zeros(4), 4)


def test_select_topk_keeps_k_highest_per_head():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 20, generator=gen)
    scores[:, :3] = float("-inf")  # sinks
    scores[2, 10] = float("-inf")
    keep = select_topk(scores, 6)
    assert keep.sum(-1).tolist() == [6, 6, 6, 6]
    for h in range(4):
        kept, dropped = scores[h][keep[h]], scores[h][~keep[h]]
        assert kept.min() > dropped.max()
    # k beyond the smallest finite count is clamped: head 2 has 16 finite scores.
    keep_all = select_topk(scores, 100)
    assert keep_all.sum(-1).tolist() == [16, 16, 16, 16]
    assert torch.isfinite(scores[keep_all]).all()


@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize(
    "view",
    [
        lambda x: x,
        lambda x: x[:, 2:9],  # a slice of whole rows, as the cache read hands it over
        lambda x: x[:, :, 1:4],  # part of each row
        lambda x: x.transpose(0, 1).contiguous().transpose(0, 1),  # token-major storage
    ],
)
def test_gather_tokens_takes_each_heads_own_tokens_in_order(view, token_major):
    gen = torch.Generator().manual_seed(4)
    x = view(torch.randn(3, 10, 5, generator=gen))
    index = torch.tensor([[0, 3, 6], [6, 1, 1], [2, 4, 5]])
    got = gather_tokens(x, index, token_major=token_major)
    assert got.shape == (3, 3, x.shape[2])
    assert got.transpose(0, 1).is_contiguous() == token_major
    for h in range(3):
        for i, j in enumerate(index[h].tolist()):
            assert torch.equal(got[h, i], x[h, j])


def test_normalize_by_max_over_candidates():
    x = torch.tensor([[5.0, 1.0, 2.0, 4.0], [0.0, 0.0, 0.0, 9.0]])
    candidates = torch.tensor([False, True, True, True])
    result = normalize_by_max(x, candidates)
    torch.testing.assert_close(result[0], torch.tensor([0.0, 0.25, 0.5, 1.0]))
    torch.testing.assert_close(result[1], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert torch.all(normalize_by_max(torch.zeros(2, 4), candidates) == 0)


def test_retention_score_mixes_pooled_normalised_terms():
    gen = torch.Generator().manual_seed(4)
    alpha, entropy = torch.rand(2, 12, generator=gen), torch.rand(2, 12, generator=gen)
    candidates = torch.ones(2, 12, dtype=torch.bool)
    candidates[:, :2] = False
    score = retention_score(alpha, entropy, 0.3, candidates, 3)
    expected = 0.3 * normalize_by_max(pool1d(alpha, 3), candidates) + 0.7 * normalize_by_max(
        pool1d(entropy, 3), candidates
    )
    assert torch.all(score[:, :2] == float("-inf"))
    torch.testing.assert_close(score[:, 2:], expected[:, 2:])
    assert score[:, 2:].max() <= 1.0
