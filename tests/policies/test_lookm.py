"""`lookm` against per-token loops: text-prior ranking and averaged merging into the most
cosine-similar kept key."""

import torch

from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.core import PatchLayout
from retentivekv_vllm.policies import Observation, make_policy
from retentivekv_vllm.policies.lookm import merge_into_most_similar


def merge_loop(keys, values, kept):
    """The definition, one evicted token at a time."""
    heads, n, _ = keys.shape
    sums_k, sums_v = keys.double().clone(), values.double().clone()
    counts = torch.ones(heads, n, dtype=torch.float64)
    for h in range(heads):
        kept_slots = [j for j in range(n) if kept[h, j]]
        for i in range(n):
            if kept[h, i]:
                continue
            cos = [
                float(
                    torch.nn.functional.cosine_similarity(
                        keys[h, i].double(), keys[h, j].double(), dim=0
                    )
                )
                for j in kept_slots
            ]
            target = kept_slots[max(range(len(cos)), key=cos.__getitem__)]
            sums_k[h, target] += keys[h, i].double()
            sums_v[h, target] += values[h, i].double()
            counts[h, target] += 1
    merged_k, merged_v = keys.double().clone(), values.double().clone()
    merged_k[kept] = (sums_k / counts[..., None])[kept]
    merged_v[kept] = (sums_v / counts[..., None])[kept]
    return merged_k, merged_v


def test_merge_matches_the_per_token_definition():
    generator = torch.Generator().manual_seed(0)
    heads, n, d = 3, 40, 16
    keys = torch.randn(heads, n, d, generator=generator)
    values = torch.randn(heads, n, d + 4, generator=generator)
    kept = torch.rand(heads, n, generator=generator) < 0.3
    kept[:, 0] = True  # every head keeps something
    got_k, got_v = merge_into_most_similar(keys, values, kept)
    want_k, want_v = merge_loop(keys, values, kept)
    torch.testing.assert_close(got_k[kept].double(), want_k[kept], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_v[kept].double(), want_v[kept], rtol=1e-5, atol=1e-5)
    # Some kept token really received evicted ones, so the check above compares merged rows.
    assert not torch.allclose(got_v[kept], values[kept])


def test_text_prior_ranks_every_text_token_above_every_image_token():
    generator = torch.Generator().manual_seed(1)
    heads, n = 2, 30
    image = torch.full((heads, n), -1, dtype=torch.long)
    image[:, 5:21] = 0  # a 4x4 image in slots 5..20
    grid = torch.arange(16)
    row, col = torch.full_like(image, -1), torch.full_like(image, -1)
    row[:, 5:21], col[:, 5:21] = grid // 4, grid % 4
    layout = PatchLayout(image, row, col, ((4, 4),))
    accumulated = torch.rand(heads, n, generator=generator)
    accumulated[:, 5:21] += 10.0  # images draw far more attention than text
    candidates = torch.ones(heads, n, dtype=torch.bool)
    obs = Observation(
        torch.zeros(heads, 1, n), torch.arange(n).expand(heads, -1), candidates, accumulated, layout
    )
    policy = make_policy(KVPolicyConfig(policy="lookm"))
    kept = policy.select(obs, 10)
    text = ~layout.visual
    for h in range(heads):
        # 14 text tokens and k = 10: the 10 text tokens of most attention, no image token.
        want = torch.zeros(n, dtype=torch.bool)
        text_slots = text[h].nonzero().squeeze(1)
        want[text_slots[accumulated[h, text_slots].argsort(descending=True)[:10]]] = True
        assert torch.equal(kept[h], want)
    # Without images the score is the accumulated attention (H2O's).
    plain = Observation(obs.probs, obs.positions, candidates, accumulated, None)
    assert torch.equal(policy.score(plain), accumulated)
