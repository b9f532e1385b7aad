"""`knorm` against its plain torch definition: per head, keep the candidates of lowest key norm."""

import pytest
import torch

from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.policies import Observation, make_policy


def lowest_norm_loop(keys, candidates, k):
    """The definition, one head at a time: the k candidates whose keys are shortest."""
    kept = torch.zeros(candidates.shape, dtype=torch.bool)
    for h in range(keys.shape[0]):
        slots = [j for j in range(keys.shape[1]) if candidates[h, j]]
        norms = [float(torch.linalg.vector_norm(keys[h, j].double())) for j in slots]
        for i in sorted(range(len(slots)), key=norms.__getitem__)[:k]:
            kept[h, slots[i]] = True
    return kept


def test_knorm_keeps_the_lowest_norm_candidates_of_each_head():
    generator = torch.Generator().manual_seed(0)
    heads, n, d, k = 3, 50, 16, 12
    # Norms spread over a decade, so the ranking is not decided by rounding.
    spread = torch.rand(heads, n, 1, generator=generator).mul(9).add(1)
    keys = torch.randn(heads, n, d, generator=generator) * spread
    candidates = torch.rand(heads, n, generator=generator) < 0.8
    candidates[:, :2] = False  # sinks
    positions = torch.arange(n).expand(heads, -1)
    obs = Observation(None, positions, candidates, torch.zeros(heads, n), keys=keys)
    kept = make_policy(KVPolicyConfig(policy="knorm")).select(obs, k)
    assert torch.equal(kept, lowest_norm_loop(keys, candidates, k))
    # It is not the shortest keys overall: a sink with the lowest norm is never among them.
    keys[:, 0] = 0.0
    assert not make_policy(KVPolicyConfig(policy="knorm")).select(obs, k)[:, 0].any()


def test_knorm_without_keys_names_the_policy():
    candidates = torch.ones(1, 4, dtype=torch.bool)
    obs = Observation(None, torch.arange(4).expand(1, -1), candidates, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="--kv-policy knorm"):
        make_policy(KVPolicyConfig(policy="knorm")).score(obs)
