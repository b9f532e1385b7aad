"""`knorm` (kvpress's KnormPress): keep the tokens whose keys have the lowest L2 norm.

Low-norm keys tend to draw high attention (Devoto et al. 2024, "A Simple and Effective L2
Norm-Based Strategy for KV Cache Compression"), so the score needs no attention at all: it is
the negated norm of each cached key. RoPE rotates pairs of coordinates, so the norm is the same
before and after it, and the keys as they sit in the cache give kvpress's score exactly.
"""

import torch

from retentivekv_vllm.policies.base import KVPolicy, Observation, register_policy


@register_policy
class KnormPolicy(KVPolicy):
    name = "knorm"

    def score(self, obs: Observation) -> torch.Tensor:
        if obs.keys is None:
            raise ValueError("--kv-policy knorm scores the cached keys; this Observation has none")
        return -obs.keys.float().norm(dim=-1)
