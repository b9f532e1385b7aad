"""`snapkv`: observation-window attention, smoothed by 1-D pooling."""

import torch

from retentivekv_vllm.core import pool1d
from retentivekv_vllm.policies.base import KVPolicy, Observation, register_policy


@register_policy
class SnapKVPolicy(KVPolicy):
    name = "snapkv"

    def score(self, obs: Observation) -> torch.Tensor:
        return pool1d(obs.alpha, self.config.pool_kernel)
